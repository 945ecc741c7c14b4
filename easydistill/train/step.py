"""One KD step's sums: the student's rows at the label positions, each teacher's rows, then the loss.

`kd_step_sums` (what KDTrainer.compute_loss calls) computes a micro-batch's CE and KD sums in one of two ways:
plain (`chunk_size` 0: logits only where labels are, then CE and `combined_divergence`), or fused
(`chunk_size` > 0: final hidden states at the label positions, then `loss.chunked.fused_head_loss`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.loss.chunked import RowSource, fused_head_loss
from easydistill.loss.combine import combined_divergence
from easydistill.models import final_hidden_states

IGNORE_INDEX = -100
# Config keys of models that rescale or squash the head's output after the matmul: applying the head weight
# ourselves would skip that step, so such models take the plain path.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


# ---------------------------------------------------------------- models: hidden states, heads, label rows


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) labels -> (mask (B, T-1), targets (N,)). Logits at t predict token t + 1: mask[b, t] says whether
    position t's prediction counts, targets are the tokens it should predict, in row-major order."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/compile wrappers (the PEFT model stays: its adapters are part of the student)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


def head_unsupported(model: torch.nn.Module) -> str | None:
    """Why this causal LM's logits are not just `get_output_embeddings()(final hidden)`; None when they are."""
    base = _base(model)
    if not _takes_logits_to_keep(base):
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    if base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for key in _LOGIT_POSTPROCESSING:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            return f"{type(base).__name__} post-processes its logits ({key}={value})"
    return None


def logits_at_labels(model: torch.nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
    """(N, V) student logits at the label positions only (`logits_to_keep` as a boolean (B, T) mask), through
    the model's own forward (DDP hooks, post-processing); full logits then a gather if it cannot do that."""
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    n = int(mask.sum())
    if _takes_logits_to_keep(model):
        keep = F.pad(mask, (0, 1), value=False)  # (B, T): the last position predicts nothing
        logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
        if logits.dim() == 2 and logits.shape[0] == n:
            return logits
    return model(**kwargs).logits[:, :-1][mask]


def hidden_at_labels(model: torch.nn.Module, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
    """(N, H) the student's final hidden states at the label positions, through the model's own forward (so
    DDP prepares its backward) with no logits computed."""
    return final_hidden_states(model, inputs)[:, :-1][mask]


def _teacher_can_project(teacher) -> bool:
    return (
        hasattr(teacher, "hidden_rows")
        and hasattr(teacher, "head_logits")
        and head_unsupported(teacher.model) is None
    )


def _slice_rows(rows, positions: slice):
    if torch.is_tensor(rows) or hasattr(rows, "__getitem__"):
        return rows[positions]
    # Stored sparse rows without slicing: rebuild from their fields (ids, log_probs, tail, vocab_width).
    return type(rows)(rows.ids[positions], rows.log_probs[positions], rows.tail[positions], rows.vocab_width)


def _teacher_sources(teachers, inputs, mask, student_head=None) -> list[RowSource]:
    """Per teacher, its rows for a slice of the positions. Model teachers keep (N, H_t) hidden rows and
    project a chunk at a time (into the caller's buffer, or with the student's rows when they share its
    plain head); stored teachers hand over their rows, sliced."""
    sources = []
    for teacher in teachers:
        if _teacher_can_project(teacher):
            hidden = teacher.hidden_rows(inputs, mask)
            head = _base(teacher.model).get_output_embeddings()
            fetch = lambda positions, out, t=teacher, h=hidden: t.head_logits(h[positions], out=out)  # noqa: E731
            shares = type(head) is torch.nn.Linear and head is student_head
            sources.append(RowSource(fetch, head.weight.shape[0], hidden if shares else None))
        else:
            rows = teacher.rows(inputs, mask)
            sources.append(RowSource(lambda positions, out, r=rows: _slice_rows(r, positions)))
    return sources


# ---------------------------------------------------------------- the trainer's entry point


@dataclass
class StepSums:
    """One micro-batch's sums. The trainer's loss is `objective / N_step` (tokens of the whole step)."""

    objective: Tensor  # (1 − kd_ratio)·CE_sum + kd_ratio·KD_sum, differentiable
    ce_sum: Tensor  # detached, for logging
    kd_sum: Tensor
    own_sums: list[Tensor]  # each teacher's own divergence sum
    n_tokens: int
    outputs: Any = None  # the model outputs (full logits), only when asked for


_warned: set[str] = set()


def kd_step_sums(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    teachers: Sequence = (),
    *,
    kd_ratio: float = 0.5,
    kind: str = "forward_kld",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    combine: str = "weighted_loss",
    temperature: float = 1.0,
    chunk_size: int = 0,
    return_outputs: bool = False,
) -> StepSums:
    """CE and KD sums of one micro-batch, for KDTrainer.compute_loss.

    chunk_size 0: logits only at the label positions; > 0: the fused chunked path (`fused_head_loss`).
    return_outputs: the old full-logit path, for callers that need the model outputs (evaluation).
    Models whose head is not a plain projection (`head_unsupported`) fall back to the plain path.
    """
    mask, targets = label_positions(inputs["labels"])
    use_kd = bool(teachers) and kd_ratio > 0
    ce_weight, kd_weight = 1.0 - kd_ratio, kd_ratio
    weights = [t.spec.weight for t in teachers]
    temperatures = [t.spec.temperature for t in teachers]
    options = dict(combine=combine, kind=kind, beta=beta, skew_alpha=skew_alpha)

    fused = chunk_size > 0 and not return_outputs
    if fused and (reason := head_unsupported(model)) is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"distillation.chunk_size: {reason}; using the plain KD path", stacklevel=2)
        fused = False

    if fused:
        hidden = hidden_at_labels(model, inputs, mask)  # (N, H_s)
        head = _unwrap(model).get_output_embeddings()
        sums = fused_head_loss(
            hidden,
            head,
            targets,
            _teacher_sources(teachers, inputs, mask, head) if use_kd else [],
            weights,
            temperatures,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            student_temperature=temperature,
            chunk_size=chunk_size,
            **options,
        )
        own = sums.own_sums if use_kd else [sums.ce_sum.new_zeros(()) for _ in teachers]
        return StepSums(sums.objective, sums.ce_sum, sums.kd_sum, own, targets.numel())

    outputs = None
    if return_outputs:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        student = outputs.logits[:, :-1][mask]  # (N, V_s)
    else:
        student = logits_at_labels(model, inputs, mask)
    ce_sum = F.cross_entropy(student.float(), targets, reduction="sum")
    kd_sum, own = ce_sum.new_zeros(()), [ce_sum.new_zeros(()) for _ in teachers]
    if use_kd:
        rows = [
            t.rows(inputs, mask)
            if return_outputs or not _teacher_can_project(t)
            else t.head_logits(t.hidden_rows(inputs, mask))
            for t in teachers
        ]  # each (N, V_t), or sparse
        kd_sum, own = combined_divergence(
            student, rows, weights, temperatures, targets, student_temperature=temperature, **options
        )
    objective = ce_weight * ce_sum + kd_weight * kd_sum
    return StepSums(
        objective, ce_sum.detach(), kd_sum.detach(), [o.detach() for o in own], targets.numel(), outputs
    )
