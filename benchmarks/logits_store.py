"""Size and speed of the top-k logits store against EasyDistill v1's JSONL, on tiny offline models.

    python -m benchmarks.logits_store [--samples 256] [--steps 30]

Prints (docs/logits.md quotes a run):
1. bytes per stored label position, our store vs v1's JSONL, at k = 10 and k = 50. v1 lines are written as
   v1 wrote them (json.dumps of {str(token id): math.exp(logprob)}); their size depends on how many digits the
   ids have, so they are measured twice: with the tiny vocabulary's ids and with ids spread over a
   Qwen-size vocabulary (151,936), where our ids also take 3 bytes instead of 2.
2. read throughput of the store (memory-mapped, CRC-checked), and of CachedTeacher.rows on training batches;
3. training step time with the cached teacher against the online teacher, same tiny models, same batches.
One CPU thread, as the tests use: the numbers compare formats and code paths, not hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

QWEN_VOCAB = 151_936


def config(root: Path, teacher: Path, student: Path, data: Path, *, steps: int, **dataset) -> dict:
    return {
        "job_type": "kd_white_box",
        "dataset": {"labeled_path": str(data), "seed": 0, **dataset},
        "inference": {"batch_size": 16},
        "distillation": {"kd_ratio": 0.5, "max_seq_length": 128},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {
            "output_dir": str(root / "out"),
            "overwrite_output_dir": True,
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-4,
            "logging_steps": 1_000_000,
            "save_strategy": "no",
            "disable_tqdm": True,
            "seed": 0,
        },
        "lora": {"enable": True, "r": 8, "alpha": 16, "dropout": 0.0},
    }


def v1_line_bytes(rows_ids: np.ndarray, rows_lp: np.ndarray, id_map=None) -> int:
    """Bytes of one v1 JSONL line (with its newline) for one sample's rows."""
    rows = []
    for ids, lps in zip(rows_ids, rows_lp):
        keys = ids if id_map is None else id_map[ids]
        rows.append({str(int(i)): math.exp(float(lp)) for i, lp in zip(keys, lps)})
    return len(json.dumps(rows).encode()) + 1


def measure_sizes(root, teacher, student, data, top_k: int) -> dict:
    from easydistill.config import load_config
    from easydistill.store.precompute import prepare_teacher_outputs
    from easydistill.store.topk import TopKLogitsStore, bytes_per_position

    raw = config(root, teacher, student, data, steps=1, logits_path=str(root / f"store-{top_k}"))
    raw["inference"]["top_logits_num"] = top_k
    start = time.perf_counter()
    prepare_teacher_outputs(load_config(raw), log=lambda *a: None)
    infer_seconds = time.perf_counter() - start
    store = TopKLogitsStore(root / f"store-{top_k}")
    positions = sum(sum(c["length"]) for c in store.splits.values())
    shard_bytes = sum(f.stat().st_size for f in store.path.glob("shard-*.safetensors"))
    index_bytes = (store.path / "index.json").stat().st_size
    id_map = np.random.default_rng(0).permutation(QWEN_VOCAB)[: store.vocab_width]
    v1_small = v1_qwen = 0
    for i in range(store.count("train")):
        ids, log_probs, _ = store.read(store.entry("train", i))
        lp = log_probs.astype(np.float32)  # v1 has fp32 log-probs; the digits printed do not depend on it
        v1_small += v1_line_bytes(ids, lp)
        v1_qwen += v1_line_bytes(ids, lp, id_map)
    return {
        "k": top_k,
        "positions": positions,
        "ours": (shard_bytes + index_bytes) / positions,
        "ours_shards": shard_bytes / positions,
        "ours_qwen": bytes_per_position(top_k, QWEN_VOCAB) + index_bytes / positions,
        "v1": v1_small / positions,
        "v1_qwen": v1_qwen / positions,
        "infer_positions_per_s": positions / infer_seconds,
    }


def measure_reads(root, teacher, student, data) -> dict:
    from easydistill.config import load_config
    from easydistill.store.topk import TopKLogitsStore
    from easydistill.train.trainer import prepare_run

    store = TopKLogitsStore(root / "store-50")
    entries = [store.entry("train", i) for i in range(store.count("train"))]
    order = np.random.default_rng(0).permutation(len(entries))
    start, positions = time.perf_counter(), 0
    for _ in range(5):
        for i in order:
            positions += len(store.read(entries[i])[2])
    seconds = time.perf_counter() - start
    raw = config(root, teacher, student, data, steps=1, logits_path=str(root / "store-50"))
    with contextlib.redirect_stdout(io.StringIO()):  # prepare_run's data / model lines
        run = prepare_run(load_config(raw))
    batches = list(run.trainer.get_train_dataloader())
    teacher_rows = run.trainer.teachers[0]
    start = time.perf_counter()
    for batch in batches:
        teacher_rows.rows(batch, batch["labels"][:, 1:] != -100)
    batch_seconds = (time.perf_counter() - start) / len(batches)
    return {
        "positions_per_s": positions / seconds,
        "mb_per_s": positions * store.bytes_per_position / seconds / 1e6,
        "rows_ms_per_batch": 1e3 * batch_seconds,
    }


def step_time(root, teacher, student, data, steps: int, **dataset) -> float:
    """Mean seconds per optimizer step, the first 3 steps (warm-up) left out."""
    from transformers import TrainerCallback

    from easydistill.config import load_config
    from easydistill.train.trainer import prepare_run

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.times = {}, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts[state.global_step] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.starts[state.global_step - 1])

    clock = Clock()
    with contextlib.redirect_stdout(io.StringIO()):  # prepare_run's lines and Trainer's final metrics
        run = prepare_run(load_config(config(root, teacher, student, data, steps=steps, **dataset)))
        run.trainer.add_callback(clock)
        run.trainer.train()
    return float(np.mean(clock.times[3:]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.logits_store", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--samples", type=int, default=256, help="training records (synthetic 'reverse' task)"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps timed per teacher kind")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from examples.synthetic import make_records
    from examples.tiny_models import build_pair

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-logits-") as tmp:
        root = Path(tmp)
        teacher, student = build_pair(root / "models")
        data = root / "train.jsonl"
        records = make_records("reverse", args.samples, seed=0)
        data.write_text("".join(json.dumps(r) + "\n" for r in records))

        print("bytes per stored label position (our store includes its index.json)")
        print(
            f"{'k':>4} {'v1 JSONL':>10} {'ours':>8} {'ratio':>7} | {'v1 JSONL, Qwen ids':>19} {'ours, 3-byte ids':>17} {'ratio':>7}"
        )
        sizes = [measure_sizes(root, teacher, student, data, k) for k in (10, 50)]
        for s in sizes:
            print(
                f"{s['k']:>4} {s['v1']:>10.1f} {s['ours']:>8.1f} {s['v1'] / s['ours']:>6.1f}x | "
                f"{s['v1_qwen']:>19.1f} {s['ours_qwen']:>17.1f} {s['v1_qwen'] / s['ours_qwen']:>6.1f}x"
            )
        print(
            f"({sizes[0]['positions']} positions; scoring ran at {sizes[0]['infer_positions_per_s']:,.0f} positions/s)"
        )

        reads = measure_reads(root, teacher, student, data)
        print(
            f"\nread, k=50, random sample order: {reads['positions_per_s']:,.0f} positions/s "
            f"({reads['mb_per_s']:.1f} MB/s); CachedTeacher.rows: {reads['rows_ms_per_batch']:.2f} ms per batch of 8"
        )

        online = step_time(root, teacher, student, data, args.steps)
        cached = {
            k: step_time(root, teacher, student, data, args.steps, logits_path=str(root / f"store-{k}"))
            for k in (10, 50)
        }
        print(f"\nstep time, batch 8, {args.steps} steps: online teacher {1e3 * online:.1f} ms", end="")
        print("".join(f"; cached k={k} {1e3 * t:.1f} ms" for k, t in cached.items()))


if __name__ == "__main__":
    main()
