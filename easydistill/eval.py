"""Held-out evaluation of a student against its teachers: is the student closer to them than before?

    python -m easydistill.eval --config configs/kd_white_box.json               # the run in training.output_dir
    python -m easydistill.eval --config configs/kd_white_box.json --model DIR   # any model or adapter folder

On the config's eval split (`dataset.eval_path`, or `dataset.eval_ratio` of the labelled data), for the student
and for each teacher: cross-entropy and perplexity on the labels, top-1 accuracy; for the student against each
teacher KL(teacher ‖ student) and JSD per token and top-1 agreement, and for stored (cached) teachers the mass
their top-k keeps and the student's mass on those ids; exact match of greedy answers (batched, KV cache) when the
records are `examples.synthetic` tasks, whose answers can be checked. Prints a table and writes JSON (`--out`,
default `eval.json` in training.output_dir when that folder exists). The config is checked as every entry point
checks it; a problem ends the run with exit code 2 and one message, before any weights load.

Without --model: the trained run in training.output_dir when it holds one, else models.student (before
training). An adapter folder (adapter_config.json) is applied to models.student.
"""

from __future__ import annotations

import json
from pathlib import Path

from easydistill.cli import config_parser, load_and_check, run
from easydistill.errors import UserError
from easydistill.evaluation.heldout import (
    eval_records,
    eval_teachers,
    evaluate_models,
    exact_match_references,
    format_tables,
    has_eval_split,
    load_evaluated,
    resolve_model,
    settings,
)
from easydistill.runtime import print0


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.eval", __doc__.splitlines()[0])
    parser.add_argument("--model", help="model or adapter folder to evaluate (default: see above)")
    parser.add_argument("--out", help="JSON file to write (default: training.output_dir/eval.json)")
    parser.add_argument("--no-generate", action="store_true", help="skip exact match (no generation)")
    args = parser.parse_args(argv)
    cfg, _ = load_and_check(args.config, check_output_dir=False)
    if not has_eval_split(cfg):
        raise UserError(
            "$.dataset: no eval split to evaluate on; set dataset.eval_path or dataset.eval_ratio"
        )
    if not cfg.dataset.labeled_path:
        raise UserError(
            "$.dataset.labeled_path: evaluation needs labelled records (with only instruction_path, let "
            "kd.infer write the teacher's answers first)"
        )
    folder = resolve_model(cfg, args.model)
    options = settings(cfg)

    import torch
    from transformers.utils import logging as hf_logging

    from easydistill.models import load_tokenizer
    from easydistill.store.precompute import training_examples

    hf_logging.disable_progress_bar()  # one bar per loaded file is noise here

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
    _, examples, _ = training_examples(cfg, tokenizer)
    if not examples:
        raise UserError("$.dataset: the eval split holds no example with a response token")
    if options.max_samples:
        examples = examples[: options.max_samples]
    references, why = exact_match_references(eval_records(cfg, examples), options.exact_match)
    model = load_evaluated(cfg, folder).to(device)
    teachers = eval_teachers(cfg, model, device)
    print0(f"evaluating {folder} on {len(examples)} eval examples; exact match {why}")
    result = evaluate_models(
        model,
        tokenizer,
        teachers,
        examples,
        references,
        template=cfg.dataset.template,
        batch_size=cfg.training.per_device_eval_batch_size or 8,
        max_new_tokens=options.max_new_tokens,
        generate=not args.no_generate,
    )
    result = {"config": cfg.source, "model": str(folder), "exact_match_basis": why, **result}
    print0(format_tables(result, "evaluated model"))
    out = (
        Path(args.out)
        if args.out
        else (cfg.output_dir if cfg.output_dir.is_dir() else Path(".")) / "eval.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print0(f"written: {out}")
    return 0


if __name__ == "__main__":
    run(main)
