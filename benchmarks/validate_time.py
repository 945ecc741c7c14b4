"""Wall time of `python -m easydistill.validate` on every shipped config, pointed at tiny model folders.

    python -m benchmarks.validate_time            # 5 runs per config, the median of each
    python -m benchmarks.validate_time --runs 9

Each run is a whole new process, as a user types it. The tiny teacher and student (examples.tiny_models)
and a 64-record data file are built once in a temporary folder; each config keeps its own settings (LoRA,
teacher kind, template) with only model, data and output paths replaced. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_validate(config: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "easydistill.validate", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"validate failed on {config}:\n{proc.stderr}")
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.validate_time", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from examples.synthetic import make_records
    from examples.tiny_models import build_pair, point_config_at

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = build_pair(root / "models")
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_records("add", 64, seed=1)))
        for shipped in sorted((REPO / "configs").glob("*.json")):
            raw = point_config_at(
                json.loads(shipped.read_text()), teacher, student, data, root / shipped.stem, REPO
            )
            config = root / shipped.name
            config.write_text(json.dumps(raw))
            times = time_validate(config, args.runs)
            rows.append((shipped.name, statistics.median(times), min(times), max(times)))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; {args.runs} runs each")
    print("| config | median (s) | min (s) | max (s) |\n| --- | ---: | ---: | ---: |")
    for name, median, low, high in rows:
        print(f"| {name} | {median:.2f} | {low:.2f} | {high:.2f} |")


if __name__ == "__main__":
    main()
