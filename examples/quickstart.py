"""The quickstart: distil a small trained teacher into a smaller student, offline on a CPU, in a few minutes.

    python -m examples.quickstart                 # or: make demo
    python -m examples.quickstart --fast          # a few steps on tiny data: a smoke run in seconds

1. writes a synthetic task (`reverse`: "reverse: bdca" -> "acdb") as EasyDistill v1 {instruction, output}
   JSONL under WORKDIR/data: clean training records (the teacher's), the same records with 40% of the
   outputs replaced by wrong answers (the students' distillation data, noisy as real data often is), and
   held-out records disjoint from them;
2. trains a teacher (Qwen2 architecture, hidden 96 x 3 layers) with cross-entropy on the clean records through
   our own trainer, once: it is cached in $EASYDISTILL_CACHE (default ~/.cache/easydistill) and copied to
   WORKDIR/models/teacher;
3. builds a smaller random-init student (hidden 64 x 2 layers, same tokenizer) in WORKDIR/models/student;
4. distils it on the noisy records with configs/quickstart.json, the same path as
   `python -m easydistill.kd.train` (which also writes report.md / report.json / loss_curves.png there);
5. trains the same student with cross-entropy only on the same noisy records, at equal steps, as a baseline
   (skip: --no-baseline);
6. prints held-out figures before and after (CE, KL(teacher||student), top-1 agreement, exact match) and
   writes them to WORKDIR/report.json.

Afterwards the KD run also works by itself: python -m easydistill.kd.train --config configs/quickstart.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from easydistill.models import quiet_loading
from easydistill.runtime import print0
from examples import synthetic, tiny_models

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = REPO_ROOT / "configs" / "quickstart.json"
SHIPPED_WORKDIR = "runs/quickstart"  # the prefix of every path configs/quickstart.json writes to
TEACHER_MARKER = "quickstart_teacher.json"  # written last into a cached teacher: its presence means complete
# Modules whose code decides the cached teacher's weights (a package counts with all its files); an edit
# to any of them retrains it. Named as modules, not paths, so that splitting a file does not break the key.
TEACHER_MODULES = (
    "examples.quickstart",
    "examples.synthetic",
    "examples.tiny_models",
    "easydistill.data",
    "easydistill.models",
    "easydistill.train",
    "easydistill.loss",
    "easydistill.config",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    task: str = "reverse"
    n_train: int = 4000
    n_heldout: int = 500
    data_seed: int = 0
    teacher_steps: int = 800
    teacher_batch: int = 64
    teacher_lr: float = 3e-3
    seed: int = 0
    # The student's run comes from configs/quickstart.json; these override it when set.
    student_steps: int | None = None
    student_batch: int | None = None
    # Share of the distillation records whose output is replaced by a wrong answer (see `corrupt`). The
    # teacher learnt from clean labels, so it knows more than these labels say: what KD can pass on.
    student_label_noise: float = 0.4
    # Student initialisation and training order (data order, dropout); the teacher does not depend on it.
    student_seed: int = 0


FULL = Recipe()
FAST = Recipe(n_train=96, n_heldout=16, teacher_steps=6, teacher_batch=16, student_steps=3, student_batch=16)


# ---------------------------------------------------------------- data


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def corrupt(records: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """(copy of `records` with round(share * n) outputs replaced by a wrong answer, how many were replaced).

    A replaced output is a random string of the right length over the task's alphabet (digits for add and
    sort, letters otherwise) that differs from the right answer: a labeller who sometimes answers garbage.
    Which records, and their wrong answers, are a pure function of (records, share, seed).
    """
    rng = random.Random(f"examples.quickstart.noise:{seed}")
    picked = set(rng.sample(range(len(records)), round(share * len(records))))
    out = []
    for i, record in enumerate(records):
        if i in picked:
            right = record["output"]
            alphabet = synthetic.LETTERS if right.isalpha() else synthetic.DIGITS
            wrong = right
            while wrong == right:
                wrong = "".join(rng.choice(alphabet) for _ in right)
            record = {**record, "output": wrong}
        out.append(record)
    return out, len(picked)


def write_data(recipe: Recipe, data_dir: Path) -> tuple[list[dict], list[dict], int]:
    """train.jsonl (clean: the teacher's), distill.jsonl (the same instructions, a share of outputs wrong:
    the student's), heldout.jsonl (clean, disjoint). Returns (train, heldout, number of corrupted outputs)."""
    train = synthetic.make_records(recipe.task, recipe.n_train, seed=recipe.data_seed)
    heldout = synthetic.make_records(recipe.task, recipe.n_heldout, seed=recipe.data_seed + 1, exclude=train)
    distill, n_wrong = corrupt(train, recipe.student_label_noise, recipe.data_seed)
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "distill.jsonl", distill)
    write_jsonl(data_dir / "heldout.jsonl", heldout)
    return train, heldout, n_wrong


# ---------------------------------------------------------------- the teacher, trained once and cached


def _source_hashes() -> dict[str, str]:
    """sha256 of every file of TEACHER_MODULES and of the v1 template, keyed by path inside the repository."""
    import importlib

    from easydistill.data import V1_TEMPLATE

    root = Path(__file__).resolve().parents[1]
    files = {V1_TEMPLATE.resolve()}
    for name in TEACHER_MODULES:
        path = Path(importlib.import_module(name).__file__).resolve()
        if path.name == "__init__.py":  # a package: its code and its data files (e.g. config/schema.json)
            files.update(p for p in path.parent.rglob("*") if p.suffix in (".py", ".json", ".jinja"))
        else:
            files.add(path)
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(files)
        if "__pycache__" not in f.parts
    }


def teacher_key(recipe: Recipe) -> str:
    """Hash of what decides the teacher's weights: its recipe, the library versions, our source files."""
    import accelerate
    import tokenizers
    import torch
    import transformers

    parts = {
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if not k.startswith("student_")},
        "architecture": tiny_models.TEACHER,
        "versions": [
            torch.__version__,
            transformers.__version__,
            tokenizers.__version__,
            accelerate.__version__,
        ],
        "sources": _source_hashes(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def teacher_config(recipe: Recipe, train_path: Path, init_dir: Path, out_dir: Path, quiet: bool) -> dict:
    """Plain cross-entropy on the labels (a black-box job without a teacher) for the randomly initialised teacher."""
    from easydistill.data import V1_TEMPLATE

    return {
        "$comment": "The quickstart's teacher: cross-entropy on the synthetic task, built by examples.quickstart",
        "job_type": "kd_black_box_train_only",
        "dataset": {"labeled_path": str(train_path), "template": str(V1_TEMPLATE)},
        "distillation": {"max_seq_length": 64},
        "models": {"student": str(init_dir)},
        "training": {
            "output_dir": str(out_dir),
            "overwrite_output_dir": True,
            "max_steps": recipe.teacher_steps,
            "per_device_train_batch_size": recipe.teacher_batch,
            "learning_rate": recipe.teacher_lr,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,
            "weight_decay": 0.0,
            "logging_steps": max(recipe.teacher_steps // 4, 1),
            "save_strategy": "no",
            "seed": recipe.seed,
            "report_to": "none",
            "disable_tqdm": quiet,
        },
    }


def cached_teacher(
    recipe: Recipe, tokenizer, train_path: Path, cache_root: Path, quiet: bool
) -> tuple[Path, bool]:
    """(teacher folder, reused?). Trained in a temporary sibling and renamed into place when complete."""
    from easydistill.config import load_config
    from easydistill.train.trainer import run_training

    key = teacher_key(recipe)
    final = cache_root / f"quickstart-teacher-{key}"
    if (final / TEACHER_MARKER).is_file():
        print0(f"teacher: reusing the cached teacher {final}")
        return final, True
    print0(f"teacher: training once with cross-entropy, {recipe.teacher_steps} steps (cached as {final})")
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".quickstart-teacher-{key}-", dir=cache_root))
    try:
        rows = (len(tokenizer) // 64 + 1) * 64  # padded embedding rows, as Qwen ships them
        init = tiny_models.build_model(
            work / "init", tokenizer=tokenizer, padded_vocab=rows, seed=recipe.seed, **tiny_models.TEACHER
        )
        out = work / "teacher"
        started = time.perf_counter()
        metrics = run_training(load_config(teacher_config(recipe, train_path, init, out, quiet)))
        marker = {"key": key, "recipe": dataclasses.asdict(recipe), "seconds": time.perf_counter() - started}
        marker["train_loss"] = metrics.get("train_loss")
        (out / TEACHER_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not (final / TEACHER_MARKER).is_file():
            shutil.rmtree(final)  # left half-written by something else: ours is complete
        try:
            os.replace(out, final)
        except OSError:  # another process renamed its complete copy into place first
            if not (final / TEACHER_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final, False


# ---------------------------------------------------------------- the KD config and its baseline


def kd_config(workdir: Path, recipe: Recipe, quiet: bool) -> dict:
    """configs/quickstart.json with its runs/quickstart paths moved to `workdir` and the recipe's overrides."""
    raw = json.loads(CONFIG_PATH.read_text())

    def move(value: str) -> str:
        if value == SHIPPED_WORKDIR or value.startswith(SHIPPED_WORKDIR + "/"):
            return str(workdir / value[len(SHIPPED_WORKDIR) :].lstrip("/"))
        return value if os.path.isabs(value) else str(REPO_ROOT / value)  # e.g. the template

    for block, key in (
        ("dataset", "labeled_path"),
        ("dataset", "eval_path"),
        ("dataset", "template"),
        ("models", "teacher"),
        ("models", "student"),
        ("training", "output_dir"),
    ):
        if isinstance(raw.get(block, {}).get(key), str):
            raw[block][key] = move(raw[block][key])
    training = raw["training"]
    if recipe.student_steps is not None:
        training["max_steps"] = recipe.student_steps
        training["logging_steps"] = training["eval_steps"] = max(recipe.student_steps // 6, 1)
    if recipe.student_batch is not None:
        training["per_device_train_batch_size"] = recipe.student_batch
    training["seed"] = recipe.student_seed
    if quiet:
        training["disable_tqdm"] = True
    return raw


def ce_only_config(kd: dict, workdir: Path) -> dict:
    """The same student, data, steps and optimizer, with cross-entropy only and no teacher in the loop."""
    ce = json.loads(json.dumps(kd))
    ce["$comment"] = "The quickstart's baseline: configs/quickstart.json with cross-entropy only (no teacher)"
    ce["job_type"] = "kd_black_box_train_only"
    ce["models"].pop("teacher", None)
    ce["models"].pop("teacher_dtype", None)
    ce["distillation"]["kd_ratio"] = 0.0
    ce["training"]["output_dir"] = str(workdir / "student_ce_only")
    return ce


# ---------------------------------------------------------------- figures


COLUMNS = (
    ("ce", "CE/token"),
    ("kl", "KL(T||S)/token"),
    ("top1_agreement", "top-1 agree"),
    ("exact_match", "exact match"),
)
ROW_NAMES = {
    "teacher": "teacher (reference)",
    "student_before": "student before",
    "student_kd": "student after KD",
    "student_ce_only": "student after CE-only",
}


def measure(model_dir: Path, teacher, tokenizer, batches, heldout, template) -> dict:
    from transformers import AutoModelForCausalLM

    from easydistill.evaluation.metrics import exact_match_rate, teacher_forced_metrics

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    row = teacher_forced_metrics(model, teacher, batches)
    row["exact_match"] = exact_match_rate(model, tokenizer, heldout, template)
    return row


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'held-out':24s}" + "".join(f"{title:>16s}" for _, title in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        # CE and KL span 1e-4..6 between an untrained and a converged model: significant digits, not decimals.
        cells = [f"{row[key]:16.4g}" if key in ("ce", "kl") else f"{row[key]:16.4f}" for key, _ in COLUMNS]
        lines.append(f"{ROW_NAMES[name]:24s}" + "".join(cells))
    return "\n".join(lines)


KL_TOLERANCE = 0.05  # relative; paired KD and CE-only runs of one seed differed by up to 4% in our sweeps


def compare(kd: dict, ce: dict, n_heldout: int) -> dict:
    """KD vs CE-only at equal steps: held-out KL (lower is better) and exact match (higher is better)."""
    if kd["kl"] < ce["kl"] * (1 - KL_TOLERANCE):
        kl_verdict = "KD lower"
    elif ce["kl"] < kd["kl"] * (1 - KL_TOLERANCE):
        kl_verdict = "CE-only lower"
    else:
        kl_verdict = f"tie (within {KL_TOLERANCE:.0%})"
    records = round((kd["exact_match"] - ce["exact_match"]) * n_heldout)
    if records:
        em_verdict = (
            f"{'KD' if records > 0 else 'CE-only'} right on {abs(records)} more of {n_heldout} records"
        )
    else:
        em_verdict = "tie"
    return {
        "kl": {"kd": kd["kl"], "ce_only": ce["kl"], "verdict": kl_verdict},
        "exact_match": {"kd": kd["exact_match"], "ce_only": ce["exact_match"], "verdict": em_verdict},
        "kd_beats_ce_only": kl_verdict == "KD lower" and records > 0,
    }


# ---------------------------------------------------------------- the run


def run_quickstart(workdir: Path, recipe: Recipe, *, baseline: bool = True, quiet: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from easydistill.cli import load_and_check
    from easydistill.config import load_config
    from easydistill.data import build_dataset
    from easydistill.evaluation.metrics import make_batches
    from easydistill.train.trainer import run_training

    started = time.perf_counter()
    data_dir, models_dir = workdir / "data", workdir / "models"
    kd = kd_config(workdir, recipe, quiet)
    ce_only = ce_only_config(kd, workdir)
    kd_dir, ce_dir = Path(kd["training"]["output_dir"]), Path(ce_only["training"]["output_dir"])
    workdir.mkdir(parents=True, exist_ok=True)
    for owned in (
        data_dir,
        models_dir,
        kd_dir,
        ce_dir,
    ):  # ours to replace; nothing else in workdir is touched
        shutil.rmtree(owned, ignore_errors=True)

    print0(f"[1/5] data: task {recipe.task!r}, e.g. {synthetic.make_records(recipe.task, 1)[0]}")
    train, heldout, n_wrong = write_data(recipe, data_dir)
    print0(f"      {len(train)} training + {len(heldout)} held-out records (disjoint) in {data_dir}")
    print0(
        f"      the teacher learns from clean labels (train.jsonl); the students' copy (distill.jsonl) has "
        f"{n_wrong} of {len(train)} outputs ({recipe.student_label_noise:.0%}) replaced by wrong answers"
    )

    print0("[2/5] teacher: Qwen2, hidden {hidden_size} x {num_layers} layers".format(**tiny_models.TEACHER))
    tokenizer = tiny_models.build_tokenizer()
    cache_root = tiny_models.default_cache_root()
    cached, reused = cached_teacher(recipe, tokenizer, data_dir / "train.jsonl", cache_root, quiet)
    teacher_dir = models_dir / "teacher"
    shutil.copytree(cached, teacher_dir)

    print0(
        "[3/5] student: Qwen2, hidden {hidden_size} x {num_layers} layers, random init".format(
            **tiny_models.STUDENT
        )
    )
    student_dir = models_dir / "student"
    student_init_seed = recipe.seed + 1 + recipe.student_seed
    tiny_models.build_model(student_dir, tokenizer=tokenizer, seed=student_init_seed, **tiny_models.STUDENT)

    d, t = kd["distillation"], kd["training"]
    print0(
        f"[4/5] KD: {CONFIG_PATH.relative_to(REPO_ROOT)}: (1 - {d['kd_ratio']:g})*CE + {d['kd_ratio']:g}*"
        f"{d['distillation_type']}, {t['max_steps']} steps of {t['per_device_train_batch_size']}"
    )
    # Exactly what runs, so that `kd.train --config` can repeat it when workdir is not the shipped one.
    (workdir / "kd_config.json").write_text(json.dumps(kd, indent=2) + "\n")
    cfg, _ = load_and_check(kd)  # the checks kd.train runs: schema, cross-field rules, preflight
    run_training(cfg)
    if baseline:
        print0("[5/5] baseline: the same student, data, steps and optimizer, cross-entropy only")
        run_training(load_config(ce_only))
    else:
        print0("[5/5] baseline: skipped (--no-baseline)")

    template = kd["dataset"]["template"]
    max_length = kd["distillation"]["max_seq_length"]
    examples, _, _ = build_dataset(
        data_dir / "heldout.jsonl", tokenizer, template_path=template, max_length=max_length
    )
    batches = make_batches(examples, tokenizer.pad_token_id)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    folders = {"teacher": teacher_dir, "student_before": student_dir, "student_kd": kd_dir}
    if baseline:
        folders["student_ce_only"] = ce_dir
    rows = {name: measure(f, teacher, tokenizer, batches, heldout, template) for name, f in folders.items()}

    report = {
        "task": recipe.task,
        "recipe": dataclasses.asdict(recipe),
        "n_train": len(train),
        "n_corrupted_labels": n_wrong,
        "n_heldout": len(heldout),
        "teacher_cached": reused,
        "teacher_cache": str(cached),
        "kd_config": kd,
        "rows": rows,
        "kd_vs_ce_only": compare(rows["student_kd"], rows["student_ce_only"], len(heldout))
        if baseline
        else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict, workdir: Path) -> None:
    print0()
    print0(
        f"held-out: {report['n_heldout']} {report['task']!r} records never seen in training; per response token"
    )
    print0(format_table(report["rows"]))
    versus = report["kd_vs_ce_only"]
    if versus:
        kl, em = versus["kl"], versus["exact_match"]
        recipe = report["recipe"]
        print0(
            f"KD vs CE-only at equal steps (seed {recipe['student_seed']}, {report['n_corrupted_labels']} of "
            f"{report['n_train']} training labels wrong): KL {kl['kd']:.4g} vs {kl['ce_only']:.4g} ({kl['verdict']}); "
            f"exact match {em['kd']:.4f} vs {em['ce_only']:.4f} ({em['verdict']})"
        )
    print0(f"report: {workdir / 'report.json'}  ({report['wall_time_s']:.0f} s)")
    config = "configs/quickstart.json" if str(workdir) == SHIPPED_WORKDIR else workdir / "kd_config.json"
    print0(f"KD again, by itself: OMP_NUM_THREADS=1 python -m easydistill.kd.train --config {config}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.quickstart", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", default=SHIPPED_WORKDIR, help=f"where data, models and report go ({SHIPPED_WORKDIR})"
    )
    parser.add_argument(
        "--steps", type=int, help="student steps for KD and the baseline (default: the config's)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="a few steps on tiny data: a smoke run in seconds"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the cross-entropy-only student")
    parser.add_argument(
        "--seed", type=int, default=0, help="student initialisation and data order (the teacher is unchanged)"
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        help=f"share of the students' training outputs made wrong (default {FULL.student_label_noise})",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.label_noise is not None and not 0.0 <= args.label_noise <= 1.0:
        parser.error("--label-noise must be in [0, 1]")
    import torch

    # Models this small gain nothing from intra-op threads: measured on 2 cores, teacher training ran at
    # 12.7 steps/s with one thread and 9.4 with two (OpenMP threads spin-wait each other).
    torch.set_num_threads(1)
    recipe = FAST if args.fast else FULL
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, student_steps=args.steps)
    recipe = dataclasses.replace(recipe, student_seed=args.seed)
    if args.label_noise is not None:
        recipe = dataclasses.replace(recipe, student_label_noise=args.label_noise)
    workdir = Path(args.workdir)
    with quiet_loading():
        report = run_quickstart(workdir, recipe, baseline=not args.no_baseline, quiet=args.fast)
    print_report(report, workdir)
    return 0


if __name__ == "__main__":
    from easydistill.cli import run

    run(main)
