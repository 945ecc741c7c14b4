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
import json
import os
import random
import shutil
import time
from pathlib import Path

from easydistill.models import quiet_loading
from easydistill.runtime import print0
from examples import synthetic, tiny_models
from examples.quickstart_figures import compare, format_table, measure
from examples.quickstart_teacher import cached_teacher

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = REPO_ROOT / "configs" / "quickstart.json"
SHIPPED_WORKDIR = "runs/quickstart"  # the prefix of every path configs/quickstart.json writes to


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
    run_training(cfg, reference=synthetic.reference())
    if baseline:
        print0("[5/5] baseline: the same student, data, steps and optimizer, cross-entropy only")
        run_training(load_config(ce_only), reference=synthetic.reference())
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
