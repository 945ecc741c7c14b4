"""Held-out evaluation of a student against its teachers: is the student closer to them than before?

    python -m easydistill.eval --config configs/kd_white_box.json               # the run in training.output_dir
    python -m easydistill.eval --config configs/kd_white_box.json --model DIR   # any model or adapter folder

On the config's eval split (`dataset.eval_path`, or `dataset.eval_ratio` of the labelled data), for the student
and for each teacher: cross-entropy and perplexity on the labels, top-1 accuracy; for the student against each
teacher KL(teacher ‖ student) and JSD per token and top-1 agreement, and for stored (cached) teachers the mass
their top-k keeps and the student's mass on those ids; exact match of greedy answers against each eval record's
output (whitespace-normalised). Prints a table and writes JSON: to `--out` (an existing file only with
--overwrite; never a file or folder the config reads), or by default to a new `eval.json` (`eval-2.json`, ...)
in training.output_dir when that folder holds a run; otherwise nothing is written. The config is checked as every entry point checks it; a problem
ends the run with exit code 2 and one message, before any weights load.

Without --model: the trained run in training.output_dir when it holds one, else models.student (before
training). An adapter folder (adapter_config.json) is applied to models.student. docs/evaluation.md has the
definitions.
"""

from __future__ import annotations

import json

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import config_parser, load_and_check, run
from easydistill.evaluation.heldout import check_evaluable, evaluate_folder, format_tables, resolve_model
from easydistill.run_folder import eval_output
from easydistill.runtime import print0


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.eval", __doc__.splitlines()[0])
    parser.add_argument("--model", help="model or adapter folder to evaluate (default: see above)")
    parser.add_argument("--out", help="JSON file to write (default: a new eval[-N].json in the run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-generate", action="store_true", help="skip exact match (no generation)")
    args = parser.parse_args(argv)
    cfg, _ = load_and_check(args.config, check_output_dir=False)
    check_evaluable(cfg)
    out = eval_output(cfg, args.out, args.overwrite)  # refused here, before anything is evaluated
    folder = resolve_model(cfg, args.model)
    result = evaluate_folder(cfg, folder, generate=not args.no_generate)
    print0(format_tables(result, "evaluated model"))
    if out is None:
        print0(f"not written: {cfg.output_dir} holds no run; pass --out FILE to keep these figures")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    staging.replace(out)
    print0(f"written: {out}")
    return 0


if __name__ == "__main__":
    run(main)
