"""Held-out evaluation of a student against its teachers (the library behind `python -m easydistill.eval` and
the run report): which records, which teachers, the figures, and their tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from easydistill.errors import UserError
from easydistill.runtime import print0


@dataclass(frozen=True)
class EvalSettings:
    """The `evaluation` block (see docs/evaluation.md)."""

    report: bool = True
    exact_match: str = "auto"
    max_new_tokens: int | None = None
    max_samples: int | None = None


def settings(cfg) -> EvalSettings:
    block = dict(cfg.data.get("evaluation") or {})
    return EvalSettings(**{k: block[k] for k in EvalSettings.__dataclass_fields__ if k in block})


def has_eval_split(cfg) -> bool:
    return bool(cfg.dataset.eval_path) or bool(cfg.dataset.eval_ratio)


# ---------------------------------------------------------------- records


def eval_records(cfg, examples) -> list[dict]:
    """The chat records of the eval examples, in their order (found by sample id)."""
    from easydistill.data import load_records

    source = cfg.dataset.eval_path or cfg.dataset.labeled_path
    by_id = {r["id"]: r for r in load_records(source)}
    return [by_id[e.sample_id] for e in examples]


# ---------------------------------------------------------------- measuring


def evaluate_models(
    model,
    tokenizer,
    teachers,
    examples,
    exact_match=None,
    *,
    template=None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    teachers_too: bool = True,
    generate: bool = True,
) -> dict:
    """Figures of `model` (and, with teachers_too, of each teacher) on tokenized eval examples.

    teachers: the run's teacher objects (spec + rows(); online ones carry .model, the self-teacher the PEFT
    student). exact_match: an `ExactMatch` (evaluation/exact_match.py), or None to skip it. Returns a
    JSON-ready dict, see `heldout_metrics` for the figures' meaning.
    """
    from easydistill.evaluation.metrics import heldout_metrics, make_batches

    batches = make_batches(examples, tokenizer.pad_token_id, batch_size)
    got = heldout_metrics(model, {t.spec.name: t for t in teachers}, batches)

    def rate(generator) -> float | None:
        if exact_match is None or not generate:
            return None
        return exact_match.rate(
            generator, tokenizer, template, max_new_tokens=max_new_tokens, batch_size=batch_size
        )

    student = {**got["model"], "exact_match": rate(model), "vs": got["versus"]}
    result = {"n_examples": len(examples), "n_tokens": got["n_tokens"], "student": student, "teachers": {}}
    if teachers_too:
        for t in teachers:
            row = {"kind": t.spec.kind, **got["teachers"][t.spec.name], "exact_match": None}
            if t.spec.kind == "online":
                row["exact_match"] = rate(t.model)
            elif t.spec.kind == "self" and hasattr(t.model, "disable_adapter"):
                with t.model.disable_adapter():
                    row["exact_match"] = rate(t.model)
            if t.spec.kind == "cached":
                row["approximate_ce"] = True  # labels outside the stored ids get an even share of the tail
            result["teachers"][t.spec.name] = row
    return result


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"


def format_tables(result: dict, model_label: str = "student") -> str:
    """The figures as two plain-text tables: each model on the labels, then the student against each teacher."""
    head = f"{'model':28s}{'CE/token':>11s}{'perplexity':>12s}{'accuracy':>10s}{'exact match':>13s}"
    lines = [head, "-" * len(head)]
    rows = [(model_label, result["student"])]
    rows += [(f"teacher {name} [{r['kind']}]", r) for name, r in result["teachers"].items()]
    for label, r in rows:
        lines.append(
            f"{label[:27]:28s}{_fmt(r['ce']):>11s}{_fmt(r['perplexity']):>12s}{_fmt(r['accuracy']):>10s}"
            f"{_fmt(r['exact_match']):>13s}"
        )
    versus = result["student"]["vs"]
    if versus:
        head = f"{model_label + ' vs':28s}{'KL(T||S)':>11s}{'JSD':>12s}{'top-1 agree':>13s}{'top-k mass T/S':>17s}"
        lines += ["", head, "-" * len(head)]
        for name, v in versus.items():
            mass = f"{v['topk_mass']:.3f}/{v['student_topk_mass']:.3f}" if "topk_mass" in v else "-"
            lines.append(
                f"{'teacher ' + name:28s}{_fmt(v['kl']):>11s}{_fmt(v['jsd']):>12s}"
                f"{_fmt(v['top1_agreement']):>13s}{mass:>17s}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def resolve_model(cfg, given: str | None) -> Path:
    if given is not None:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"--model: {given!r} is not a folder")
        if not _is_model_folder(path):
            raise UserError(f"--model: {given!r} holds neither config.json nor adapter_config.json")
        return path
    if _is_model_folder(cfg.output_dir):
        return cfg.output_dir
    return Path(cfg.models.student)


def load_evaluated(cfg, folder: Path):
    """The model in `folder`; an adapter folder is applied to models.student."""
    from easydistill.models import load_causal_lm

    m = cfg.models
    options = dict(trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_causal_lm(m.student, dtype=m.dtype, **options)
        return PeftModel.from_pretrained(base, str(folder))
    return load_causal_lm(str(folder), dtype=m.dtype, **options)


def check_evaluable(cfg) -> None:
    """A UserError unless the config names labelled records with an eval split."""
    if not has_eval_split(cfg):
        raise UserError(
            "$.dataset: no eval split to evaluate on; set dataset.eval_path or dataset.eval_ratio"
        )
    if not cfg.dataset.labeled_path:
        raise UserError(
            "$.dataset.labeled_path: evaluation needs labelled records (with only instruction_path, let "
            "kd.infer write the teacher's answers first)"
        )


def evaluate_folder(cfg, folder: Path, *, generate: bool = True, reference=None, log=print0) -> dict:
    """The figures of the model in `folder` and of the config's teachers on the config's eval split.

    reference: an optional `exact_match.Reference` plug-in (a task that knows its right answers).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from easydistill.evaluation import exact_match
    from easydistill.models import load_tokenizer
    from easydistill.store.precompute import training_examples

    check_evaluable(cfg)
    options = settings(cfg)
    hf_logging.disable_progress_bar()  # one bar per loaded file is noise here
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
    _, examples, _ = training_examples(cfg, tokenizer)
    if not examples:
        raise UserError("$.dataset: the eval split holds no example with a response token")
    examples = examples[: options.max_samples or None]
    found, basis = exact_match.plan(eval_records(cfg, examples), options.exact_match, reference)
    model = load_evaluated(cfg, folder).to(device)
    teachers = eval_teachers(cfg, model, device, tokenizer, examples)
    log(f"evaluating {folder} on {len(examples)} eval examples; exact match: {basis}")
    result = evaluate_models(
        model,
        tokenizer,
        teachers,
        examples,
        found,
        template=cfg.dataset.template,
        batch_size=cfg.training.per_device_eval_batch_size or 8,
        max_new_tokens=options.max_new_tokens,
        generate=generate,
    )
    return {"config": cfg.source, "model": str(folder), "exact_match_basis": basis, **result}


def eval_teachers(cfg, model, device, tokenizer=None, examples=None):
    """The config's teachers for evaluating `model` (teachers.build_teachers, as training builds them), less
    stores without eval rows. With the student's tokenizer and the eval examples, a teacher of another
    tokenizer is compared through its projection (CrossTokenizerTeacher)."""
    from easydistill.teachers import build_teachers

    given = None if tokenizer is None else {"train": [], "eval": examples}
    return with_eval_rows(build_teachers(cfg, model, device, tokenizer=tokenizer, examples=given))


def with_eval_rows(teachers, log=print0) -> list:
    """The teachers that can be compared on the eval split: a store without eval rows would read as KL 0."""
    kept = []
    for teacher in teachers:
        store = getattr(teacher, "store", None)
        if store is not None and store.count("eval") == 0:
            log(
                f"note: teacher {teacher.spec.name!r}: its store {store.path} holds no eval rows; not evaluated"
            )
            continue
        kept.append(teacher)
    return kept
