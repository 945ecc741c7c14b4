"""Distillation across tokenizers, measured: a teacher with another tokenizer against cross-entropy alone.

    python -m examples.cross_tokenizer_demo                # or: make demo-cross-tokenizer
    python -m examples.cross_tokenizer_demo --fast         # a smoke run in seconds

The quickstart's task and data (`reverse`, the students' copy of the labels 40% wrong, held-out records
disjoint), with a teacher that does not share the student's tokenizer:
  - teacher: Llama architecture, sentencepiece-style BPE (word marker, byte fallback; examples/tiny_tokenizers.py)
    and its own chat template ("<s>user: ...</s>"), trained once with cross-entropy on the clean labels, cached;
  - student: Qwen2 architecture, byte-level BPE, ChatML (examples/tiny_models.py), random init;
  - KD: distillation.cross_tokenizer "auto" (the run notes the pair), pure KD on the noisy labels;
  - baseline: the same student, data, steps and optimizer, cross-entropy only.
Held-out figures: CE on the labels, KL(teacher || student) where the teacher is its distribution carried onto
the student's vocabulary (the loss's own projection, every student id kept), top-1 agreement, exact match,
and the alignment counts. Everything lands in WORKDIR/report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from easydistill.models import quiet_loading
from easydistill.runtime import print0
from examples import quickstart, synthetic, tiny_models
from examples.quickstart_figures import compare
from examples.quickstart_teacher import cached_teacher
from examples.tiny_tokenizers import build_sentencepiece_tokenizer

SHIPPED_WORKDIR = "runs/cross_tokenizer"
TEACHER_VOCAB = 400
ROWS = ("student_before", "student_kd", "student_ce_only")


def heldout_rows(folders: dict[str, Path], teacher_dir: Path, student_tokenizer, heldout_path: Path, heldout):
    """Held-out figures of each student folder against the cross-tokenizer teacher (every student id kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from easydistill.config import TeacherSpec
    from easydistill.data import build_dataset
    from easydistill.data.cross_pair import CrossPair
    from easydistill.evaluation.exact_match import exact_match_rate
    from easydistill.evaluation.metrics import heldout_metrics, make_batches
    from easydistill.teachers.cross_tokenizer import CrossTokenizerTeacher
    from easydistill.teachers.online import OnlineTeacher

    examples, _, _ = build_dataset(heldout_path, student_tokenizer, max_length=64)
    batches = make_batches(examples, student_tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    pair = CrossPair(student_tokenizer, AutoTokenizer.from_pretrained(teacher_dir))
    spec = TeacherSpec("teacher", "online", str(teacher_dir), None, 1.0, 1.0)
    width = len(student_tokenizer)
    teacher = CrossTokenizerTeacher(
        OnlineTeacher(spec, model), pair, {"train": examples}, student_width=width, top_k=width
    )
    rows = {}
    for name, folder in folders.items():
        student = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            got = heldout_metrics(student, {"teacher": teacher}, batches)
        versus = got["versus"]["teacher"]
        rows[name] = {
            "ce": got["model"]["ce"],
            "kl": versus["kl"],
            "top1_agreement": versus["top1_agreement"],
            "exact_match": exact_match_rate(
                student, student_tokenizer, heldout, reference=synthetic.reference()
            ),
        }
        counts = teacher.take_counts()
    rows["alignment"] = {
        "vocabulary": pair.vocab_map.summary(),
        "aligned_share": counts["aligned_positions"] / max(counts["label_positions"], 1.0),
        "mapped_mass": counts["mapped_mass"] / max(counts["aligned_positions"], 1.0),
    }
    return rows


def run(workdir: Path, recipe: quickstart.Recipe, *, quiet: bool = False) -> dict:
    from easydistill.cli import load_and_check
    from easydistill.config import load_config
    from easydistill.train.trainer import run_training

    started = time.perf_counter()
    data_dir, models_dir = workdir / "data", workdir / "models"
    kd = quickstart.kd_config(workdir, recipe, quiet)
    kd["dataset"].pop("template")  # each side renders with its own chat template
    kd["dataset"].pop("eval_path")  # held-out figures are taken at the end, below
    kd["training"].pop("eval_strategy")
    kd["training"].pop("eval_steps", None)
    kd["$comment"] = (
        "examples.cross_tokenizer_demo: configs/quickstart.json with a teacher of another tokenizer"
    )
    ce_only = quickstart.ce_only_config(kd, workdir)
    for owned in (
        data_dir,
        models_dir,
        Path(kd["training"]["output_dir"]),
        Path(ce_only["training"]["output_dir"]),
    ):
        shutil.rmtree(owned, ignore_errors=True)
    train, heldout, n_wrong = quickstart.write_data(recipe, data_dir)
    print0(
        f"[1/4] data: {len(train)} records ({n_wrong} of the students' labels wrong), {len(heldout)} held out"
    )

    teacher_tokenizer = build_sentencepiece_tokenizer(synthetic.corpus(), TEACHER_VOCAB)
    variant = {"tokenizer": "sentencepiece-bpe", "vocab": TEACHER_VOCAB, "arch": "llama", "template": "own"}
    print0(
        f"[2/4] teacher: Llama, sentencepiece-style BPE ({len(teacher_tokenizer)} tokens), its own template"
    )
    cached, _ = cached_teacher(
        recipe,
        teacher_tokenizer,
        data_dir / "train.jsonl",
        tiny_models.default_cache_root(),
        quiet,
        arch="llama",
        template=None,
        name="cross-tokenizer-teacher",
        variant=variant,
    )
    teacher_dir = models_dir / "teacher"
    shutil.copytree(cached, teacher_dir)
    student_tokenizer = tiny_models.build_tokenizer()
    student_dir = models_dir / "student"
    tiny_models.build_model(
        student_dir,
        tokenizer=student_tokenizer,
        seed=recipe.seed + 1 + recipe.student_seed,
        **tiny_models.STUDENT,
    )
    print0(f"[3/4] student: Qwen2, byte-level BPE ({len(student_tokenizer)} tokens); KD, then CE-only")
    (workdir / "kd_config.json").write_text(json.dumps(kd, indent=2) + "\n")
    cfg, report = load_and_check(kd)  # prints the pair: vocabulary overlap, aligned share
    run_training(cfg)
    run_training(load_config(ce_only))

    print0("[4/4] held-out figures")
    folders = {
        "student_before": student_dir,
        "student_kd": Path(kd["training"]["output_dir"]),
        "student_ce_only": Path(ce_only["training"]["output_dir"]),
    }
    rows = heldout_rows(folders, teacher_dir, student_tokenizer, data_dir / "heldout.jsonl", heldout)
    alignment = rows.pop("alignment")
    result = {
        "task": recipe.task,
        "recipe": dataclasses.asdict(recipe),
        "n_heldout": len(heldout),
        "n_corrupted_labels": n_wrong,
        "preflight": report.notes,
        "alignment": alignment,
        "rows": rows,
        "kd_vs_ce_only": compare(rows["student_kd"], rows["student_ce_only"], len(heldout)),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_report(result: dict, workdir: Path) -> None:
    a = result["alignment"]
    print0(f"\nheld-out: {result['n_heldout']} records; {a['vocabulary']}")
    print0(
        f"label positions with a teacher row {a['aligned_share']:.1%}, teacher mass on student ids {a['mapped_mass']:.4f}"
    )
    head = f"{'':24s}{'CE/token':>12s}{'KL(T~>S)/tok':>14s}{'top-1 agree':>13s}{'exact match':>13s}"
    print0(head + "\n" + "-" * len(head))
    for name in ROWS:
        r = result["rows"][name]
        print0(f"{name:24s}{r['ce']:12.4g}{r['kl']:14.4g}{r['top1_agreement']:13.4f}{r['exact_match']:13.4f}")
    versus = result["kd_vs_ce_only"]
    print0(f"KD vs CE-only: KL {versus['kl']['verdict']}; exact match {versus['exact_match']['verdict']}")
    print0(f"report: {workdir / 'report.json'}  ({result['wall_time_s']:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.cross_tokenizer_demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", default=SHIPPED_WORKDIR, help=f"where data, models and report go ({SHIPPED_WORKDIR})"
    )
    parser.add_argument(
        "--steps", type=int, help="student steps for KD and the baseline (default: the quickstart's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="student initialisation and data order")
    parser.add_argument(
        "--fast", action="store_true", help="a few steps on tiny data: a smoke run in seconds"
    )
    parser.add_argument(
        "--task",
        choices=synthetic.TASKS,
        help="synthetic task (default: the quickstart's reverse; add puts multi-digit numbers in the answers, "
        "which the teacher's tokenizer merges and the student's splits digit by digit)",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    recipe = quickstart.FAST if args.fast else quickstart.FULL
    recipe = dataclasses.replace(recipe, student_seed=args.seed)
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, student_steps=args.steps)
    if args.task is not None:
        recipe = dataclasses.replace(recipe, task=args.task)
    workdir = Path(args.workdir)
    with quiet_loading():
        result = run(workdir, recipe, quiet=True)
    print_report(result, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
