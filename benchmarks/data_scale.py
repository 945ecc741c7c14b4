"""Time to the first training step and peak memory of `kd.train` on large data files (docs/data.md).

    python -m benchmarks.data_scale                           # 200k short records, one 50 MB record
    python -m benchmarks.data_scale --records 1000000 --big-mb 0

Each case is a whole `python -m easydistill.kd.train` process on the tiny student (LoRA, CE only, one
optimizer step, nothing saved but the final adapter), run twice: the first run tokenizes the file, the second
finds it tokenized (the cache under EASYDISTILL_CACHE, a fresh temporary folder here). "first step" is the
wall time from the process start to its first log line (after optimizer step 1); "peak RSS" is the
process's maximum resident set (getrusage). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def short_records(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            a, b = (i * 7919) % 1000, (i * 104729) % 1000
            f.write(json.dumps({"id": i, "instruction": f"Add {a} and {b}.", "output": str(a + b)}) + "\n")
    return path


def big_record(path: Path, megabytes: int) -> Path:
    words = "the quick brown fox jumps over the lazy dog " * (megabytes * 1024 * 1024 // 44 + 1)
    record = {"id": 0, "instruction": "Write a long story.", "output": words[: megabytes * 1024 * 1024]}
    path.write_text(json.dumps(record) + "\n")
    return path


def config(student: Path, data: Path, out: Path) -> dict:
    return {
        "job_type": "kd_black_box_train_only",
        "dataset": {"labeled_path": str(data)},
        "distillation": {"max_seq_length": 512},
        "models": {"student": str(student)},
        "training": {
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
        "lora": {"enable": True, "r": 4, "alpha": 8},
    }


def run(config_path: Path, cache: Path) -> tuple[float, float]:
    """(seconds to the first logged step, peak RSS in MB) of one kd.train process."""
    env = {**os.environ, "EASYDISTILL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "easydistill.kd.train", "--config", str(config_path)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "'loss'" in line:
            first = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"kd.train failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    return first, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="short records (0: skip)")
    parser.add_argument("--big-mb", type=int, default=50, help="size of the one big record in MB (0: skip)")
    args = parser.parse_args(argv)
    from examples.tiny_models import build_pair

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, student = build_pair(root / "models")
        cases = []
        if args.records:
            cases.append(
                (f"{args.records:,} short records", short_records(root / "short.jsonl", args.records))
            )
        if args.big_mb:
            cases.append((f"one {args.big_mb} MB record", big_record(root / "big.jsonl", args.big_mb)))
        print("| data | run | first step (s) | peak RSS (MB) |\n| --- | --- | --- | --- |")
        for name, data in cases:
            path = root / f"{data.stem}.json"
            path.write_text(json.dumps(config(student, data, root / f"out-{data.stem}")))
            for which in ("first (tokenizes)", "second (cached)"):
                seconds, peak = run(path, root / "cache")
                print(f"| {name} | {which} | {seconds:.1f} | {peak:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
