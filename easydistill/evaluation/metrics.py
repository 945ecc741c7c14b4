"""Held-out figures for a student and its teachers: teacher-forced CE / KL / JSD / agreement.

    from easydistill.evaluation.metrics import make_batches, teacher_forced_metrics

    batches = make_batches(examples, tokenizer.pad_token_id)          # examples from data.build_dataset
    teacher_forced_metrics(student, teacher, batches)  # {"ce", "kl", "top1_agreement", "accuracy", "n_tokens"}

(Exact match of greedy answers is evaluation/exact_match.py.)

Every figure is per response token (positions whose label is not -100, with HF's shift: logits at t predict
token t + 1), so numbers from runs with different batch sizes or padding compare directly. Models are put in
eval mode under no_grad for the measurement and handed back in the mode they came in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch

from easydistill.data import IGNORE_INDEX, KDCollator
from easydistill.loss.rows import DenseRows


@contextlib.contextmanager
def _eval_mode(*models):
    """no_grad + eval mode for the block (`models.eval_mode` for each model: flags restored afterwards)."""
    from easydistill.models import eval_mode

    with contextlib.ExitStack() as stack:
        for model in {id(m): m for m in models if m is not None}.values():
            stack.enter_context(eval_mode(model))
        with torch.no_grad():
            yield


def _device(model) -> torch.device:
    return next(model.parameters()).device


def make_batches(examples, pad_token_id: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """TokenizedExamples (from `data.build_dataset`) -> right-padded batches as the trainer collates them."""
    collate = KDCollator(pad_token_id)
    examples = list(examples)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


class ModelRows:
    """A model seen as a teacher: `rows(batch, mask)` gives its (N, V) logits at the label positions."""

    def __init__(self, model):
        self.model = model

    def rows(self, batch: dict, mask: torch.Tensor) -> DenseRows:
        inputs = {k: batch[k].to(_device(self.model)) for k in ("input_ids", "attention_mask")}
        return DenseRows(self.model(**inputs).logits[:, :-1][mask.to(_device(self.model))].to(mask.device))


JSD_BETA = 0.5  # the symmetric Jensen-Shannon divergence: bounded by log 2, defined where KL is infinite


def _versus(s_rows: torch.Tensor, rows) -> dict[str, float]:
    """Sums over N positions of the student's (N, V_s) logits against one teacher's rows (loss/rows.py). Stored
    top-k rows score on the k stored ids + the tail bucket and add their top-k mass figures."""
    rows, shared = rows.to(s_rows.device), min(s_rows.shape[-1], rows.width)
    sums = {
        "kl": rows.per_token_divergence(s_rows, "forward_kld").sum(),
        "jsd": rows.per_token_divergence(s_rows, "jsd", beta=JSD_BETA).sum(),
        "agree": (s_rows[:, :shared].argmax(-1) == rows.top1(shared)).sum(),
        **rows.mass_figures(s_rows),
    }
    return {k: float(v) for k, v in sums.items()}


def _own(rows, targets: torch.Tensor) -> dict[str, float]:
    """Sums over N positions of a teacher's own figures on the labels: CE (nats) and top-1 accuracy. Stored rows
    give a label outside the k stored ids an even share of the tail mass."""
    ce = -rows.gold_log_prob(targets.to(rows.top1().device)).sum()
    return {"ce": float(ce), "correct": float((rows.top1().to(targets.device) == targets).sum())}


def _per_token(sums: dict[str, float], n: int) -> dict:
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if "ce" in out:
        out["perplexity"] = math.exp(min(out["ce"], 700.0))
        out["accuracy"] = out.pop("correct")
    if "agree" in out:
        out["top1_agreement"] = out.pop("agree")
    return out


def heldout_metrics(model, teachers: Mapping[str, object], batches: Iterable[dict]) -> dict:
    """Per-token figures of `model` on labelled batches, and against each teacher; the teachers' own too.

    teachers: name -> anything with `rows(batch, mask)` giving its (N, V_t) logits or stored `SparseRows` at the
    positions `mask` (B, T-1) selects (the trainer's teachers, or `ModelRows(model)`).
    Returns {"n_tokens", "model": {ce, perplexity, accuracy}, "teachers": {name: {ce, perplexity, accuracy}},
    "versus": {name: {kl, jsd, top1_agreement[, topk_mass, student_topk_mass]}}}:
      ce / perplexity  cross-entropy on the labels over the full vocabulary (nats per token), and exp(ce)
      accuracy         argmax == label
      kl               KL(p_teacher ‖ p_model) at temperature 1 on the shared vocabulary (`losses`)
      jsd              Jensen-Shannon divergence, β = 0.5 (0 ≤ jsd ≤ log 2)
      top1_agreement   the model's argmax is the teacher's
      topk_mass        stored teachers: the teacher's probability mass on its k stored ids (1 − tail)
      student_topk_mass  stored teachers: the model's mass on those same ids
    For stored teachers, kl and jsd are those of the k ids + tail bucket (what training optimises, a lower
    bound of the full divergence) and their own ce gives a label outside the k ids an even share of the tail.
    """
    model_sums: dict[str, float] = {}
    teacher_sums: dict[str, dict[str, float]] = {name: {} for name in teachers}
    versus_sums: dict[str, dict[str, float]] = {name: {} for name in teachers}
    n_tokens = 0

    def add(into: dict, values: dict) -> None:
        for k, v in values.items():
            into[k] = into.get(k, 0.0) + v

    sources = [getattr(t, "model", None) for t in teachers.values()]
    with _eval_mode(model, *[m for m in sources if isinstance(m, torch.nn.Module)]):
        device = _device(model)
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
            targets = batch["labels"][:, 1:][mask]  # (N,)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            s_rows = model(**inputs).logits[:, :-1][mask].float()  # (N, V_s)
            add(model_sums, _own(DenseRows(s_rows), targets))
            n_tokens += int(targets.numel())
            for name, teacher in teachers.items():
                rows = teacher.rows(batch, mask)
                add(teacher_sums[name], _own(rows, targets))
                add(versus_sums[name], _versus(s_rows, rows))
    return {
        "n_tokens": n_tokens,
        "model": _per_token(model_sums, n_tokens),
        "teachers": {name: _per_token(v, n_tokens) for name, v in teacher_sums.items()},
        "versus": {name: _per_token(v, n_tokens) for name, v in versus_sums.items()},
    }


def teacher_forced_metrics(student, teacher, batches: Iterable[dict]) -> dict:
    """Per-token figures of `student` on labelled batches, against `teacher` (a model) when one is given.

    batches: dicts with input_ids, attention_mask, labels (B, T), labels -100 where nothing is predicted.
    Returns
      ce              cross-entropy of the student on the labels (nats per token, full student vocabulary)
      accuracy        student argmax == label
      kl              KL(p_teacher ‖ p_student) per token, both cut to the shared vocabulary width
                      (padded embedding rows are not tokens), as `losses` computes it at temperature 1
      top1_agreement  student argmax == teacher argmax on the shared vocabulary
      n_tokens        how many positions were counted
    kl and top1_agreement are None without a teacher. Both models see the same inputs in eval mode.
    (`heldout_metrics` gives more: perplexity, JSD, several or stored teachers, the teachers' own figures.)
    """
    teachers = {} if teacher is None else {"teacher": ModelRows(teacher)}
    got = heldout_metrics(student, teachers, batches)
    versus = got["versus"].get("teacher", {})
    return {
        "ce": got["model"].get("ce", 0.0),
        "accuracy": got["model"].get("accuracy", 0.0),
        "kl": versus.get("kl") if teacher is not None else None,
        "top1_agreement": versus.get("top1_agreement") if teacher is not None else None,
        "n_tokens": got["n_tokens"],
    }
