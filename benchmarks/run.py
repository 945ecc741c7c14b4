"""One KD training step, side by side: easydistill's paths against TRL's GKDTrainer and DistillationTrainer.

    make bench                                # installs the `bench` extra (trl), then the full run (~12 min)
    python -m benchmarks.run                  # the same, vocabularies 32000 and 151936
    python -m benchmarks.run --quick          # vocabulary 32000 only, 2 timed repeats (~1 min)

Same models, same batch, same process, steps interleaved so that every method sees the same machine load.
Models are Qwen2-architecture with random weights, built in-process (no hub): a teacher (hidden 256, 4 layers)
and a student (hidden 128, 2 layers); batch 2 x 256 tokens with 16-token prompts, so 480 label positions.

A step is zero_grad + loss + backward (what Trainer.training_step runs); the optimizer update is the same for
every method and left out. Memory: `step_mib` is the resident-set high-water mark during the step minus the
resident set just before it (Linux /proc/self/clear_refs + VmHWM, after gc and malloc_trim), so it counts
every byte the step touches, torch's or not. For the self-teacher comparison `peak_mib` adds the bytes of the
weights the method has to hold (student + adapters + teacher copy, counted once per storage).

Writes benchmarks/results.json and prints a markdown table (docs/performance.md carries it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "results.json"
BATCH, SEQ, PROMPT = 2, 256, 16
TEACHER = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024}
STUDENT = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 512}
KD = {"kind": "jsd", "beta": 0.5, "kd_ratio": 0.5}  # TRL runs pure JSD; easydistill adds CE in the same pass


# ---------------------------------------------------------------- memory


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def measure_step_memory(step, modules=()) -> float | None:
    """MiB the step adds to the resident set at its peak. The previous step's gradients of `modules` are
    dropped first: the step would free and reuse them, hiding that much of its own peak."""
    for module in modules:
        module.zero_grad(set_to_none=True)
    gc.collect()
    _malloc_trim()
    before = _status("VmRSS")
    if before is None or not _reset_peak():
        step()
        return None
    step()
    return (_status("VmHWM") - before) / 2**20


def weight_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules`, each storage counted once."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# ---------------------------------------------------------------- models and data


def causal_lm(vocab: int, seed: int, sizes: dict):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def spec(name: str):
    return SimpleNamespace(name=name, weight=1.0, temperature=1.0, kind="online")


@dataclass
class Method:
    name: str
    group: str  # "online" (full fine-tuning, separate teacher) or "self" (LoRA on the teacher-size model)
    step: object  # () -> dict of loss values
    holds: tuple = ()  # modules whose weights this method must keep in memory
    note: str = ""
    times: list = field(default_factory=list)
    kernel: list = field(default_factory=list)
    step_mib: float | None = None
    losses: dict = field(default_factory=dict)


def easydistill_step(model, inputs, teachers, chunk_size, full_logits=False):
    from easydistill.config import KDLoss
    from easydistill.train.step import kd_step

    loss = KDLoss(**KD, skew_alpha=0.1, combine="weighted_loss", temperature=1.0, chunk_size=chunk_size)

    def step():
        model.zero_grad(set_to_none=True)
        sums = kd_step(model, inputs, teachers, loss, return_outputs=full_logits)
        n = max(sums.n_tokens, 1)
        (sums.objective / n).backward()
        return {"ce": float(sums.ce_sum) / n, "kd": float(sums.kd_sum) / n}

    return step


def sft_step(model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return {"ce": float(loss.detach())}

    return step


def trl_methods(student, teacher, inputs, workdir: str, tokenizer) -> list[Method]:
    """TRL's GKDTrainer (lmbda=0: off-policy, on the batch's completions) and DistillationTrainer's chunked loss
    teacher-forced on the same completions (its trainer only trains on completions it generates itself)."""
    try:
        import trl
        from datasets import Dataset
        from trl import DistillationConfig, DistillationTrainer
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        print(f"  TRL rows skipped ({exc}); `make bench` installs the bench extra", file=sys.stderr)
        return []
    common = dict(report_to="none", use_cpu=True, per_device_train_batch_size=BATCH, bf16=False)
    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]]}
    )
    gkd = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=GKDConfig(
            output_dir=f"{workdir}/gkd", lmbda=0.0, beta=KD["beta"], temperature=1.0, max_length=SEQ, **common
        ),
        train_dataset=chat,
        processing_class=tokenizer,
    )

    def gkd_step():
        student.zero_grad(set_to_none=True)
        loss = gkd.compute_loss(student, dict(inputs))
        loss.backward()
        return {"kd": float(loss.detach())}

    tokenizer.padding_side = "left"
    distill = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(output_dir=f"{workdir}/distill", beta=KD["beta"], temperature=1.0, **common),
        train_dataset=Dataset.from_dict({"prompt": ["1+1"]}),
        processing_class=tokenizer,
    )
    ids = inputs["input_ids"]
    completion = {
        "prompt_ids": ids[:, :PROMPT],
        "prompt_mask": torch.ones_like(ids[:, :PROMPT]),
        "completion_ids": ids[:, PROMPT:],
        "completion_mask": torch.ones_like(ids[:, PROMPT:]),
    }

    def distill_step():
        student.zero_grad(set_to_none=True)
        loss, _, _ = distill._compute_loss(student, completion, None)
        loss.backward()
        return {"kd": float(loss.detach())}

    version = trl.__version__
    return [
        Method(f"TRL {version} GKDTrainer", "online", gkd_step, (student, teacher), "lmbda=0, beta=0.5"),
        Method(
            f"TRL {version} DistillationTrainer loss",
            "online",
            distill_step,
            (student, teacher),
            "its chunked JSD, teacher-forced on the batch",
        ),
    ]


def build_methods(vocab: int, chunk_size: int, sweep, workdir: str, with_trl: bool) -> list[Method]:
    from peft import LoraConfig, get_peft_model

    from easydistill.teachers import OnlineTeacher, SelfTeacher
    from examples.tiny_models import build_tokenizer

    inputs = make_batch(vocab)
    teacher = causal_lm(vocab, 1, TEACHER).requires_grad_(False).eval()
    student = causal_lm(vocab, 2, STUDENT).train()
    online = [OnlineTeacher(spec("teacher"), teacher)]
    methods = [
        Method("SFT step (HF, full logits)", "online", sft_step(student, inputs), (student,)),
        Method(
            "easydistill plain, full logits",
            "online",
            easydistill_step(student, inputs, online, 0, full_logits=True),
            (student, teacher),
            "the trainer before this change",
        ),
        Method(
            "easydistill plain, label rows",
            "online",
            easydistill_step(student, inputs, online, 0),
            (student, teacher),
            "logits only where labels are",
        ),
        Method(
            f"easydistill fused, chunk {chunk_size}",
            "online",
            easydistill_step(student, inputs, online, chunk_size),
            (student, teacher),
        ),
    ]
    methods += [
        Method(
            f"easydistill fused, chunk {size}",
            "online",
            easydistill_step(student, inputs, online, size),
            (student, teacher),
            "chunk size sweep",
        )
        for size in sweep
    ]
    if with_trl:
        methods[1:1] = trl_methods(student, teacher, inputs, workdir, build_tokenizer())

    # Self-distillation: the teacher-size model adapted with LoRA, its own base as the teacher, against the same
    # LoRA student with a separate frozen copy of the base (`teacher`, built from the same seed) as the teacher.
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    adapted = get_peft_model(causal_lm(vocab, 1, TEACHER), lora).train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # as after some training: student != its base
        torch.manual_seed(3)
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    methods += [
        Method("SFT step (HF, full logits), LoRA", "self", sft_step(adapted, inputs), (adapted,)),
        Method(
            f"self-teacher fused, chunk {chunk_size}",
            "self",
            easydistill_step(adapted, inputs, [SelfTeacher(spec("self"), adapted)], chunk_size),
            (adapted,),
            "base weights shared",
        ),
        Method(
            f"separate teacher copy fused, chunk {chunk_size}",
            "self",
            easydistill_step(adapted, inputs, online, chunk_size),
            (adapted, teacher),
            "same weights, second copy",
        ),
        *[
            Method(
                f"self-teacher fused, chunk {size}",
                "self",
                easydistill_step(adapted, inputs, [SelfTeacher(spec("self"), adapted)], size),
                (adapted,),
                "chunk size sweep",
            )
            for size in sweep
            if size in (16, 64)
        ],
        Method(
            "self-teacher plain, full logits",
            "self",
            easydistill_step(adapted, inputs, [SelfTeacher(spec("self"), adapted)], 0, full_logits=True),
            (adapted,),
        ),
    ]
    return methods


# ---------------------------------------------------------------- running and reporting


def run_vocab(vocab: int, args, workdir: str) -> dict:
    print(f"vocab {vocab}: building models", file=sys.stderr)
    methods = build_methods(vocab, args.chunk_size, args.sweep, workdir, not args.no_trl)
    for m in methods:  # warm-up (first-touch allocations, lazy init), then the memory step
        m.losses = m.step()
        m.step_mib = measure_step_memory(m.step, m.holds)
        print(f"  {m.name}: step +{m.step_mib or 0:.0f} MiB", file=sys.stderr)
    for rep in range(args.repeats):
        order = methods[rep % len(methods) :] + methods[: rep % len(methods)]  # rotate: no fixed neighbour
        for m in order:
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            m.step()
            m.times.append(time.perf_counter() - start)
            m.kernel.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - before.ru_stime)
        print(f"  repeat {rep + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for m in methods:
        weights = weight_bytes(*m.holds) / 2**20
        rows.append(
            {
                "method": m.name,
                "group": m.group,
                "note": m.note,
                "median_s": statistics.median(m.times),
                "times_s": [round(t, 4) for t in m.times],
                "kernel_s": round(statistics.median(m.kernel), 3),  # system time: page faults, mostly
                "step_mib": None if m.step_mib is None else round(m.step_mib, 1),
                "weights_mib": round(weights, 1),
                "peak_mib": None if m.step_mib is None else round(weights + m.step_mib, 1),
                "losses": {k: round(v, 6) for k, v in m.losses.items()},
            }
        )
    del methods
    gc.collect()
    return {"vocab": vocab, "rows": rows}


def _find(rows, prefix):
    return next((r for r in rows if r["method"].startswith(prefix)), None)


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with its measured ratio."""
    out = []
    for run in result["runs"]:
        rows, v = run["rows"], run["vocab"]
        fused = _find(rows, "easydistill fused")
        full = _find(rows, "easydistill plain, full")
        gkd = next((r for r in rows if "GKDTrainer" in r["method"]), None)
        if gkd and fused:
            ratio = gkd["median_s"] / fused["median_s"]
            out.append(
                {
                    "vocab": v,
                    "target": "KD step throughput >= 2x TRL GKDTrainer",
                    "value": ratio,
                    "met": ratio >= 2,
                }
            )
        if v > 100_000 and fused and full and fused["step_mib"] and full["step_mib"]:
            ratio = fused["step_mib"] / full["step_mib"]
            out.append(
                {
                    "vocab": v,
                    "target": "step memory <= 0.2x plain full-logit",
                    "value": ratio,
                    "met": ratio <= 0.2,
                }
            )
            ratio = fused["median_s"] / full["median_s"]
            out.append(
                {"vocab": v, "target": "step time <= plain full-logit", "value": ratio, "met": ratio <= 1}
            )
        self_row, copy_row = _find(rows, "self-teacher fused"), _find(rows, "separate teacher copy")
        sft_lora = _find(rows, "SFT step (HF, full logits), LoRA")
        if self_row and copy_row and self_row["peak_mib"] and copy_row["peak_mib"]:
            ratio = self_row["peak_mib"] / copy_row["peak_mib"]
            out.append(
                {
                    "vocab": v,
                    "target": "self-teacher peak <= 0.6x separate copy",
                    "value": ratio,
                    "met": ratio <= 0.6,
                }
            )
        if self_row and sft_lora:
            ratio = self_row["median_s"] / sft_lora["median_s"]
            out.append(
                {
                    "vocab": v,
                    "target": "self-teacher step <= 1.5x SFT step",
                    "value": ratio,
                    "met": ratio <= 1.5,
                }
            )
    for t in out:
        t["value"] = round(t["value"], 3)
    return out


def markdown(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        rows = run["rows"]
        lines += [
            f"**vocabulary {run['vocab']:,}**",
            "",
            "| method | step (median s) | of which kernel (s) | vs fused | step memory (MiB) | weights held (MiB) "
            "| loss values |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for group in ("online", "self"):
            anchor = _find(rows, "easydistill fused" if group == "online" else "self-teacher fused")
            for r in (r for r in rows if r["group"] == group):
                ratio = r["median_s"] / anchor["median_s"] if anchor else float("nan")
                values = ", ".join(f"{k} {v + 0.0:.5g}" for k, v in r["losses"].items())
                mem = "—" if r["step_mib"] is None else f"{r['step_mib']:.0f}"
                lines.append(
                    f"| {r['method']} | {r['median_s']:.2f} | {r['kernel_s']:.2f} | {ratio:.2f}x | {mem} "
                    f"| {r['weights_mib']:.0f} | {values} |"
                )
        lines.append("")
    lines += ["| target | vocab | measured | met |", "| --- | ---: | ---: | --- |"]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['vocab']:,} | {t['value']:.3f} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocabulary 32000 only, 2 timed repeats")
    parser.add_argument(
        "--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (default 32000 151936)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per method (default 5, quick 2)"
    )
    parser.add_argument("--chunk-size", type=int, default=32, help="positions per chunk of the fused path")
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=None,
        help="more chunk sizes for the fused row (default 16 64 128)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see docs)")
    parser.add_argument("--no-trl", action="store_true", help="leave the TRL rows out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.vocab = args.vocab or ([32000] if args.quick else [32000, 151936])
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.sweep = (
        [] if args.quick and args.sweep is None else (args.sweep if args.sweep is not None else [16, 64, 128])
    )
    args.sweep = [size for size in args.sweep if size != args.chunk_size]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    import transformers

    result = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_before": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setup": {
            "batch": BATCH,
            "seq": SEQ,
            "label_positions": BATCH * (SEQ - PROMPT),
            "teacher": TEACHER,
            "student": STUDENT,
            "loss": KD,
            "chunk_size": args.chunk_size,
            "chunk_sweep": args.sweep,
            "repeats": args.repeats,
            "memory": "RSS high-water during the step minus RSS before it (VmHWM after clear_refs)",
        },
        "runs": [],
    }
    with contextlib.suppress(ImportError):
        import trl

        result["versions"]["trl"] = trl.__version__
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for vocab in args.vocab:
            result["runs"].append(run_vocab(vocab, args, workdir))
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["targets"] = targets(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(
        f"\nwrote {args.out} in {result['wall_s']:.0f} s; load {result['machine']['load_before']} -> "
        f"{result['machine']['load_after']}"
    )


if __name__ == "__main__":
    main()
