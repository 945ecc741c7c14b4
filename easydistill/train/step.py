"""One KD step, top to bottom: batch -> the student's rows -> each teacher's rows -> the loss (loss/).

`kd_step` is what KDTrainer.compute_loss calls. `loss.chunk_size` picks how the rows exist: 0, the plain path
(logits only at the label positions, then CE and `combined_divergence`); > 0, the fused path (final hidden
states at the label positions, then `fused_head_loss` projects, scores and differentiates a chunk at a time).
Both read the same divergence table (loss/divergence.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.config.chunk_size import AUTO, auto_chunk_size
from easydistill.loss.chunked import RowSource, fused_head_loss
from easydistill.loss.combine import combined_divergence
from easydistill.loss.head import plain_linear
from easydistill.loss.rows import DenseRows
from easydistill.models import base_model, head_unsupported, hidden_at_labels, logits_at_labels, unwrap
from easydistill.train.gather import gathered, regather_for_backward, unchunkable_head
from easydistill.train.timing import StepClock, timed

IGNORE_INDEX = -100


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) labels -> (mask (B, T-1), targets (N,)). Logits at t predict token t + 1: mask[b, t] says whether
    position t's prediction counts, targets are the tokens it should predict, in row-major order."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask]


@dataclass
class StepSums:
    """One micro-batch's sums. The trainer's loss is `objective / N_step` (tokens of the whole step)."""

    objective: Tensor  # (1 − kd_ratio)·CE_sum + kd_ratio·KD_sum, differentiable
    ce_sum: Tensor  # detached, for logging
    kd_sum: Tensor
    own_sums: list[Tensor]  # each teacher's own divergence sum
    n_tokens: int
    outputs: Any = None  # the model outputs (full logits), only when asked for


def kd_step(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    teachers: Sequence,
    loss,
    *,
    return_outputs=False,
    clock: StepClock | None = None,
):
    """CE and KD sums of one micro-batch under `loss` (config.KDLoss, chunk_size resolved) -> StepSums.

    return_outputs: the full-logit forward, for callers that need the model outputs (Trainer's evaluation).
    clock: the seconds of the student's forward, the teachers' forwards and the loss are added to it.
    Models whose head is not a plain projection (`head_unsupported`) take the plain path.
    """
    mask, targets = label_positions(inputs["labels"])  # (B, T-1), (N,)
    scoring = list(teachers) if loss.kd_ratio > 0 else []
    weights, temperatures = [t.spec.weight for t in teachers], [t.spec.temperature for t in teachers]
    roots = [unwrap(model)] + [t.model for t in teachers if getattr(t, "model", None) is not None]
    student_head = getattr(unwrap(model), "get_output_embeddings", lambda: None)()
    heads = [student_head, *(t.head for t in scoring if t.projects)]
    if loss.chunk_size > 0 and not return_outputs and _fused_supported(model, heads):
        with timed(clock, "student_forward"):
            hidden = hidden_at_labels(model, inputs, mask)  # (N, H_s): the student's rows, before its head
        with timed(
            clock, "teacher_forward"
        ):  # every forward before any head is gathered (ZeRO-3 re-partitions)
            rows = [_hidden_or_rows(t, inputs, mask) for t in scoring]
        # Each head gathered once for the whole chunk loop, which then makes no collective.
        with timed(clock, "loss"), gathered(heads, roots):  # the teachers' projections too, a chunk at a time
            sources = [_row_source(t, r, student_head) for t, r in zip(scoring, rows)]
            sums = fused_head_loss(
                hidden,
                student_head,
                targets,
                sources,
                weights,
                temperatures,
                loss,
                on_backward=lambda: regather_for_backward(student_head),
            )
        own = sums.own_sums if scoring else [sums.ce_sum.new_zeros(()) for _ in teachers]
        return StepSums(sums.objective, sums.ce_sum, sums.kd_sum, own, targets.numel())

    outputs = None
    with timed(clock, "student_forward"):
        if return_outputs:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            student = outputs.logits[:, :-1][mask]  # (N, V_s)
        else:
            student = logits_at_labels(model, inputs, mask)  # (N, V_s)
    with timed(clock, "teacher_forward"):
        if return_outputs:
            rows = [t.rows(inputs, mask) for t in scoring]  # each DenseRows or SparseRows
        else:
            rows = [_hidden_or_rows(t, inputs, mask) for t in scoring]
            with gathered(heads[1:], roots):  # the teachers' projections: one gather per head
                rows = [DenseRows(t.head_logits(r)) if t.projects else r for t, r in zip(scoring, rows)]
    with timed(clock, "loss"):
        ce_sum = F.cross_entropy(student.float(), targets, reduction="sum")
        kd_sum, own = ce_sum.new_zeros(()), [ce_sum.new_zeros(()) for _ in teachers]
        if scoring:
            kd_sum, own = combined_divergence(student, rows, weights, temperatures, targets, loss)
    objective = (1.0 - loss.kd_ratio) * ce_sum + loss.kd_ratio * kd_sum
    return StepSums(
        objective, ce_sum.detach(), kd_sum.detach(), [o.detach() for o in own], targets.numel(), outputs
    )


def choose_loss_path(setting, model, teachers=(), device="cpu", *, device_memory=None):
    """(chunk_size for `kd_step`, the run's start line: which path it takes and why).

    setting: distillation.chunk_size (an int, or "auto": `auto_chunk_size` of the student's head on
    `device`). The plain path when it is 0 or when the student's logits are not head(hidden)
    (`head_unsupported`). A head sharded by ZeRO-3 / FSDP2 is gathered once per step around the chunk loop
    (train/gather.py); one that is also not a plain Linear takes the plain path at the step (`kd_step`)."""
    if setting == 0:
        return 0, "loss: plain path (distillation.chunk_size is 0): logits at the label positions only"
    reason = head_unsupported(model)
    if reason:
        return (
            0,
            f"loss: plain path, not the fused one ({reason}); distillation.chunk_size {setting!r} is unused",
        )
    if setting != AUTO:
        return int(setting), f"loss: fused chunked path, chunk_size {setting} (distillation.chunk_size)"
    config = base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, hidden = config.vocab_size, config.hidden_size
    kind = torch.device(device).type
    projected = sum(1 for t in teachers if t.projects)
    chunk = auto_chunk_size(vocab, hidden, kind, projected, device_memory)
    return (
        chunk,
        f"loss: fused chunked path, chunk_size {chunk} (auto: vocabulary {vocab:,}, hidden {hidden:,}, {kind})",
    )


_warned: set[str] = set()


def _fused_supported(model: torch.nn.Module, heads) -> bool:
    reason = head_unsupported(model) or unchunkable_head(heads)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"distillation.chunk_size: {reason}; using the plain KD path", stacklevel=3)
    return reason is None


def _hidden_or_rows(teacher, inputs: dict[str, Tensor], mask: Tensor):
    """A teacher's forward at the label positions: (N, H_t) hidden rows when we apply its head ourselves (a
    chunk at a time, or once with the head gathered), else its rows (DenseRows or SparseRows)."""
    return teacher.hidden_rows(inputs, mask) if teacher.projects else teacher.rows(inputs, mask)


def _row_source(teacher, rows, student_head) -> RowSource:
    """A teacher's rows for a slice of the positions. Model teachers project their (N, H_t) hidden rows a chunk
    at a time (into the caller's buffer, or with the student's rows when they share its plain head); stored
    teachers hand over their rows, sliced. Call with the heads gathered."""
    if not teacher.projects:
        return RowSource(lambda positions, out: rows[positions])
    shares = plain_linear(teacher.head) and teacher.head is student_head
    fetch = lambda positions, out: DenseRows(teacher.head_logits(rows[positions], out=out))  # noqa: E731
    return RowSource(fetch, teacher.head.weight.shape[0], rows if shares else None)
