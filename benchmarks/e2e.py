"""End to end, as users run them: `python -m easydistill.kd.train` against TRL's trainers, whole processes.

    python -m benchmarks.e2e                    # vocabularies 32768 and 151936, 2 repeats (~1 h on 2 busy cores)
    python -m benchmarks.e2e --quick            # 32768 only, 1 repeat
    python -m benchmarks.e2e --vocab 32768 --repeats 3

One JSON config per setting, written the way a user writes one (the default `chunk_size`, nothing tuned), run
through `easydistill.kd.train` and, for TRL, through benchmarks/trl_run.py (the same file read into GKDConfig /
SFTConfig). Each run is a new process; per step = (wall at 13 steps - wall at 3 steps) / 10, so start-up,
loading and saving cancel out. Runs are interleaved: in each repeat every setting runs its 3-step and
13-step process back to back, in an order rotated from repeat to repeat, so that all see the same machine.
Peak RSS is the process's own high-water mark (wait4's ru_maxrss), of the 13-step run.

Models: Qwen2 architecture, random weights, built here (no hub), one tokenizer padded to the vocabulary:
a teacher (hidden 256, 4 layers) and a student (hidden 128, 2 layers). Self-teacher settings train LoRA (r 16
on q/k/v/o) on the teacher-size model, against the same with a separate copy of its base as teacher, TRL's
GKDTrainer on that copy, and TRL's SFTTrainer. 64 records of 150-256 tokens, batch 2, JSD beta 0.5, lmbda 0,
one thread per process (OMP_NUM_THREADS=1). Writes benchmarks/e2e_results.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "e2e_results.json"
TEACHER = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024}
STUDENT = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}
SHORT, LONG = 3, 13
LORA = {
    "enable": True,
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
EASYDISTILL = [sys.executable, "-m", "easydistill.kd.train", "--config"]
TRL = [sys.executable, "-m", "benchmarks.trl_run", "--config"]
# (name, group, command, config)
SETTINGS = [
    ("easydistill", "online", EASYDISTILL, "online"),
    ("TRL GKDTrainer", "online", TRL, "online"),
    ("easydistill self-teacher", "self", EASYDISTILL, "self"),
    ("easydistill, separate teacher copy", "self", EASYDISTILL, "copy"),
    ("TRL SFTTrainer", "self", [*TRL[:-1], "--sft", "--config"], "self"),
]
# --trl-lora: TRL's GKDTrainer on the LoRA setting too (its teacher is a second copy of the base)
TRL_LORA = ("TRL GKDTrainer, teacher copy", "self", TRL, "copy")


def write_records(path: Path, n: int = 64, seed: int = 0) -> None:
    """Letters the tiny tokenizer never merges: one token each, so each record is 150-256 tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "copy: " + "".join(rng.choice("abcdefgh") for _ in range(24))
            output = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(120, 240)))
            f.write(json.dumps({"instruction": prompt, "output": output}) + "\n")


def build(root: Path, vocab: int) -> dict[str, dict]:
    """Models, records and the three configs (online, self, copy) of one vocabulary size."""
    from examples.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    teacher = build_model(root / "teacher", tokenizer=tokenizer, padded_vocab=vocab, seed=1, **TEACHER)
    student = build_model(root / "student", tokenizer=tokenizer, padded_vocab=vocab, seed=2, **STUDENT)
    copy = root / "teacher_copy"
    shutil.copytree(teacher, copy)
    data = root / "records.jsonl"
    write_records(data)

    def config(teacher_path, student_path, lora=None) -> dict:
        raw = {
            "job_type": "kd_white_box_train_only",
            "dataset": {"labeled_path": str(data), "seed": 0},
            "distillation": {"distillation_type": "jsd", "beta": 0.5, "max_seq_length": 256},
            "models": {"teacher": str(teacher_path), "student": str(student_path)},
            "training": {
                "per_device_train_batch_size": 2,
                "learning_rate": 1e-5,
                "logging_steps": 1,
                "save_strategy": "no",
                "report_to": "none",
                "seed": 0,
                "disable_tqdm": True,
            },
        }
        if lora:
            raw["lora"] = dict(lora)
        return raw

    return {
        "online": config(teacher, student),
        "self": config("self", teacher, LORA),
        "copy": config(copy, teacher, LORA),
    }


def run_process(command: list[str], raw: dict, steps: int, root: Path, tag: str) -> dict:
    """One whole run: wall seconds, peak RSS, and what the run logged."""
    out = root / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    raw = json.loads(json.dumps(raw))
    raw["training"].update(output_dir=str(out), max_steps=steps)
    config = root / f"{tag}.json"
    config.write_text(json.dumps(raw, indent=1))
    log = root / f"{tag}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log, "w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*command, str(config)], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    text = log.read_text()
    if status != 0:
        raise SystemExit(f"{tag} failed (status {status}):\n{text[-3000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    path = next((line for line in text.splitlines() if line.startswith("loss: ")), None)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "max_rss_mib": usage.ru_maxrss / 1024,
        "logs": [e for e in history if "loss" in e],
        "path": path,
    }


def _logged(long: dict, wall_diff: float) -> dict:
    """What easydistill logged over steps SHORT+1..LONG, beside the same tokens over the measured time."""
    entries = [e for e in long["logs"] if e["step"] > SHORT and "step_seconds" in e]
    if not entries:
        return {}
    tokens = sum(e["tokens_per_second"] * e["step_seconds"] for e in entries)
    seconds = sum(e["step_seconds"] for e in entries)
    parts = {k: statistics.mean(e[k] for e in entries) for k in entries[0] if k.startswith("time/")}
    return {
        "tokens_per_second_logged": tokens / seconds,
        "tokens_per_second_measured": tokens / wall_diff if wall_diff > 0 else float("nan"),
        "step_seconds_logged": seconds / len(entries),
        "split": parts,
    }


# What each tool's process imports before it reads a config: the floor under its peak RSS.
IMPORTS = {
    "easydistill": "import easydistill.kd.train, easydistill.train.trainer, peft",
    "TRL": "import trl, trl.experimental.gkd, peft",
}


def import_floors_mib() -> dict[str, float]:
    """Peak RSS of a process that only imports what a tool's run imports (interpreter, torch, transformers,
    peft, the tool), so that what a setting itself adds can be read apart from it."""
    floors = {}
    for tool, code in IMPORTS.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(proc.pid, 0)
        floors[tool] = usage.ru_maxrss / 1024
    return floors


def run_repeat(state: dict, r: int, settings: list) -> None:
    """Repeat r of one vocabulary: every setting's 3-step and 13-step runs back to back, in rotated order."""
    vocab, root = state["vocab"], state["root"]
    order = settings[r % len(settings) :] + settings[: r % len(settings)]
    for name, _, command, which in order:
        for steps in (SHORT, LONG) if r % 2 == 0 else (LONG, SHORT):
            result = run_process(
                command, state["configs"][which], steps, root, f"v{vocab}-r{r}-{which}-{steps}"
            )
            state["walls"].setdefault(name, {SHORT: [], LONG: []})[steps].append(result["wall_s"])
            if steps == LONG:
                state["last"][name] = result
            print(f"  vocab {vocab} repeat {r} {name}, {steps} steps: {result['wall_s']:.1f} s", flush=True)


def rows_of(state: dict, settings: list) -> dict:
    rows = []
    for name, group, _, _ in settings:
        walls = state["walls"][name]
        per_step = [(b - a) / (LONG - SHORT) for a, b in zip(walls[SHORT], walls[LONG])]
        long = state["last"][name]
        rows.append(
            {
                "setting": name,
                "group": group,
                "per_step_s": per_step,
                "per_step_median_s": statistics.median(per_step),
                "walls": walls,
                "max_rss_mib": long["max_rss_mib"],
                "loss_path": long["path"],
                **_logged(long, statistics.median(per_step) * (LONG - SHORT)),
            }
        )
    return {"vocab": state["vocab"], "rows": rows}


def targets(result: dict) -> list[dict]:
    out = []
    for run in result["runs"]:
        row = {r["setting"]: r for r in run["rows"]}
        ed, trl = row["easydistill"], row["TRL GKDTrainer"]
        need = 2.0 if run["vocab"] < 100_000 else 3.0
        base = result["import_floors_mib"]["easydistill"]
        speed = trl["per_step_median_s"] / ed["per_step_median_s"]
        self_, copy, sft = (
            row["easydistill self-teacher"],
            row["easydistill, separate teacher copy"],
            row["TRL SFTTrainer"],
        )
        out += [
            {
                "target": f"TRL GKDTrainer / easydistill per step >= {need:g}",
                "vocab": run["vocab"],
                "value": speed,
                "met": speed >= need,
            },
            {
                "target": "peak RSS easydistill <= TRL GKDTrainer",
                "vocab": run["vocab"],
                "value": ed["max_rss_mib"] / trl["max_rss_mib"],
                "met": ed["max_rss_mib"] <= trl["max_rss_mib"],
            },
            {
                "target": "self-teacher per step <= 1.5x SFT (same LoRA model)",
                "vocab": run["vocab"],
                "value": self_["per_step_median_s"] / sft["per_step_median_s"],
                "met": self_["per_step_median_s"] <= 1.5 * sft["per_step_median_s"],
            },
            {
                "target": "self-teacher peak RSS <= 0.6x separate teacher copy",
                "vocab": run["vocab"],
                "value": self_["max_rss_mib"] / copy["max_rss_mib"],
                "met": self_["max_rss_mib"] <= 0.6 * copy["max_rss_mib"],
            },
            {
                "target": "the same, above easydistill's import floor",
                "vocab": run["vocab"],
                "value": (self_["max_rss_mib"] - base) / (copy["max_rss_mib"] - base),
                "met": self_["max_rss_mib"] - base <= 0.6 * (copy["max_rss_mib"] - base),
            },
        ]
    return out


def markdown(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        lines += [
            f"**vocabulary {run['vocab']:,}**",
            "",
            "| setting | per step (median s) | repeats (s) | vs easydistill | peak RSS (MiB) | logged step_seconds "
            "| tokens/s logged / measured | loss path |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- | --- |",
        ]
        anchor: dict[str, dict] = {}  # the first easydistill row of each group
        for r in run["rows"]:
            if r["setting"].startswith("easydistill"):
                anchor.setdefault(r["group"], r)
        for r in run["rows"]:
            ratio = r["per_step_median_s"] / anchor[r["group"]]["per_step_median_s"]
            repeats = ", ".join(f"{x:.2f}" for x in r["per_step_s"])
            logged = f"{r['step_seconds_logged']:.2f}" if "step_seconds_logged" in r else "—"
            tps = (
                f"{r['tokens_per_second_logged']:.0f} / {r['tokens_per_second_measured']:.0f}"
                if "tokens_per_second_logged" in r
                else "—"
            )
            path = (r["loss_path"] or "—").removeprefix("loss: ").split(" (")[0]
            lines.append(
                f"| {r['setting']} | {r['per_step_median_s']:.2f} | {repeats} | {ratio:.2f}x | {r['max_rss_mib']:.0f} "
                f"| {logged} | {tps} | {path} |"
            )
        lines += ["", "| setting | " + " | ".join(k.removeprefix("time/") for k in _split_keys(run)) + " |"]
        lines.append("| --- |" + " ---: |" * len(_split_keys(run)))
        for r in run["rows"]:
            if r.get("split"):
                lines.append(
                    f"| {r['setting']} | "
                    + " | ".join(f"{r['split'][k]:.3f}" for k in _split_keys(run))
                    + " |"
                )
        lines.append("")
    floors = ", ".join(f"{tool} {mib:.0f} MiB" for tool, mib in result["import_floors_mib"].items())
    lines += [f"Import floors (a process that only imports what the tool's run imports): {floors}.", ""]
    lines += ["| target | vocab | measured | met |", "| --- | ---: | ---: | --- |"]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['vocab']:,} | {t['value']:.2f} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines)


SPLIT_ORDER = ("generation", "teacher_forward", "student_forward", "loss", "student_backward", "other")


def _split_keys(run: dict) -> list[str]:
    """The time/* keys the rows logged, in the order of a step."""
    keys = {k for r in run["rows"] for k in r.get("split", {})}
    return [f"time/{p}" for p in SPLIT_ORDER if f"time/{p}" in keys]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocabulary 32768 only, 1 repeat")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="default 32768 151936")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--trl-lora", action="store_true", help="TRL's GKDTrainer on the LoRA setting too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, help="print the tables of a saved result file (no runs)")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        result.setdefault("import_floors_mib", import_floors_mib())
        result["targets"] = targets(result)
        args.render.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))
        return
    vocabs = args.vocab or ([32768] if args.quick else [32768, 151936])
    repeats = args.repeats or (1 if args.quick else 2)
    import torch
    import transformers
    import trl

    result = {
        "command": "python -m benchmarks.e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1},
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "setup": {
            "teacher": TEACHER,
            "student": STUDENT,
            "lora": LORA,
            "steps": [SHORT, LONG],
            "repeats": repeats,
        },
        "runs": [],
        "import_floors_mib": import_floors_mib(),
    }
    settings = SETTINGS + ([TRL_LORA] if args.trl_lora else [])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        states = []
        for vocab in vocabs:
            root = Path(tmp) / str(vocab)
            root.mkdir()
            states.append(
                {"vocab": vocab, "root": root, "configs": build(root, vocab), "walls": {}, "last": {}}
            )
        # Repeats outermost: after the first, every vocabulary has a complete (if single) table.
        for r in range(repeats):
            for state in states:
                run_repeat(state, r, settings)
                result["runs"] = [rows_of(x, settings) for x in states if x["last"]]
                result["repeats_done"] = r + 1
                result["load_after"] = [round(x, 2) for x in os.getloadavg()]
                result["wall_s"] = round(time.perf_counter() - started, 1)
                result["targets"] = targets(result)
                args.out.write_text(json.dumps(result, indent=2) + "\n")  # a partial run still counts
    print(markdown(result))
    print(
        f"\nload average {result['load_before']} before, {result['load_after']} after; {result['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
