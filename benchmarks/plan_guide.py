"""The GKD LoRA self-distillation guide's memory table (Qwen3-Omni-30B-A3B, 8 GPUs, DeepSpeed ZeRO-3), planned.

    python -m benchmarks.plan_guide            # prints the markdown table of docs/distributed.md

A Qwen3-30B-A3B-shaped config.json (benchmarks/qwen3_30b_a3b/, written from the published dimensions: hidden
2048, 48 layers, 32 heads / 4 KV heads of 128, 128 experts with 8 active of intermediate 768, vocabulary
151936; 30.5B parameters) on the meta device, bf16, LoRA on all linear layers, max_seq_length 2048, gradient
checkpointing, the fused loss (chunk_size 1024) and the plain one (logits at the label rows), per device under ZeRO-3 on 8 devices. The guide's figures
are measured GPU memory (allocator caches, CUDA context and the Omni model's audio/vision towers included);
ours count tensors only: compare the ratios.
"""

from __future__ import annotations

from pathlib import Path

from easydistill.config import load_config
from easydistill.memory_plan import MIB, make_plan, read_arch
from easydistill.memory_sharding import EngineSpec, per_device

MODEL = str(Path(__file__).resolve().parent / "qwen3_30b_a3b")
# "Two separate models": the same architecture in another folder (the same folder is a self-teacher).
SEPARATE = MODEL + "-teacher"
GUIDE = {  # (setup, batch, rank) -> GB per GPU, from the guide's table
    ("separate", 4, 8): 60,
    ("self", 4, 8): 36,
    ("self", 6, 8): 45,
    ("self", 2, 8): 28,
    ("self", 4, 16): 38,
}


def scenario(teacher: str, batch: int, rank: int, arch, chunk: int = 1024):
    raw = {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": "unused.jsonl"},
        "distillation": {
            "kd_ratio": 1.0,
            "max_seq_length": 2048,
            "distillation_type": "jsd",
            "chunk_size": chunk,
        },
        "models": {
            "student": MODEL,
            "teacher": "self" if teacher == "self" else SEPARATE,
            "dtype": "bfloat16",
            "teacher_dtype": "bfloat16",
        },
        "training": {
            "output_dir": "unused",
            "per_device_train_batch_size": batch,
            "bf16": True,
            "gradient_checkpointing": True,
        },
        "lora": {"enable": True, "r": rank, "alpha": 2 * rank, "target_modules": "all-linear"},
    }
    cfg = load_config(raw)
    plan = make_plan(cfg, archs={MODEL: arch, SEPARATE: arch})
    teachers = {} if teacher == "self" else {cfg.teachers[0].name: arch}
    return per_device(plan, EngineSpec("zero3", 8), arch, teachers)


def main() -> None:
    arch = read_arch(MODEL)
    print(f"{arch.params / 1e9:.2f}B parameters; per device, ZeRO-3 on 8 devices\n")
    print("| setup | batch | rank | planned, fused loss (GiB) | planned, plain loss (GiB) | guide (GB) |")
    print("|---|---|---|---|---|---|")
    planned = {}
    for (teacher, batch, rank), guide in GUIDE.items():
        device = scenario(teacher, batch, rank, arch)
        planned[(teacher, batch, rank)] = device.peak
        plain = scenario(teacher, batch, rank, arch, chunk=0).peak / MIB / 1024
        print(
            f"| {teacher} teacher | {batch} | {rank} | {device.peak / MIB / 1024:.1f} | {plain:.1f} | ~{guide} |"
        )
    ratio = planned[("self", 4, 8)] / planned[("separate", 4, 8)]
    print(
        f"\nself / separate at batch 4, rank 8: planned {ratio:.2f} (saves {1 - ratio:.0%}); guide 36/60 = 0.60"
    )
    print("\n" + scenario("self", 4, 8, arch).table())


if __name__ == "__main__":
    main()
