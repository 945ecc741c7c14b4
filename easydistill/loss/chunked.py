"""The KD step's loss without (tokens × vocab) logits: the LM head, CE and the divergence, a chunk at a time.

For a 152k vocabulary the logits dominate a KD step: 4 × 2048 label positions are ~5 GB of fp32 logits per
model before any softmax. `fused_head_loss` takes the student's final hidden states at the N label positions
and, for each chunk of positions, computes the student's and every teacher's logits, CE + KD, and at once the
gradient of that chunk's objective w.r.t. its logits, turned into the gradient of the hidden rows (and of the
head weight when it trains) before the logits are dropped (loss/head.py). Backward only scales the stored
gradients: nothing is recomputed, and one chunk of logits per model is alive at a time.

Dense teacher rows with `weighted_loss` / `sum` take the divergence table's closed-form gradients on reused
buffers (`ce_kd_chunk`); stored sparse rows, `mixture` and `confidence` take the plain path's own code
(`combined_divergence`, which reads the same table) on the chunk's logits. Pure tensor code (torch only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.loss.combine import combined_divergence
from easydistill.loss.divergence import LOGIT_FLOOR, divergence_into
from easydistill.loss.head import ChunkBuffers, StudentHead
from easydistill.loss.rows import DenseRows


@dataclass(eq=False)  # compared by identity
class RowSource:
    """One teacher's rows for a slice of the N label positions: `fetch(positions, out)` gives DenseRows or
    SparseRows; dense logits go into `out`, an (n, width) fp32 buffer, when they can (check the result).
    `width` is the width of projected logits, None for rows that are not projected here."""

    fetch: Callable[[slice, Tensor | None], Any]
    width: int | None = None
    # Set when the rows are the student's own head applied to these (N, H) hidden states (a self-teacher whose
    # adapters leave the head alone): they are projected in the same matmul as the student's rows.
    shared_hidden: Tensor | None = None


@dataclass
class HeadLossSums:
    objective: Tensor  # ce_weight · ce_sum + kd_weight · kd_sum, differentiable w.r.t. hidden and the head
    ce_sum: Tensor  # detached fp32 sums over the N positions
    kd_sum: Tensor
    own_sums: list[Tensor] = field(default_factory=list)  # each teacher's own divergence sum (for logging)


@dataclass
class ChunkSums:
    ce: Tensor  # fp32 scalars: CE and the combined KD summed over the chunk's positions
    kd: Tensor
    own: list[Tensor]  # each teacher's own divergence sum
    grad: Tensor | None  # (n, V_s) fp32 ∂(ce_weight·CE + kd_weight·KD)/∂z; may live in a buffer


def log_softmax_(x: Tensor, probs: Tensor) -> Tensor:
    """In place: x (n, V) becomes log_softmax(x); `probs` (n, V) receives softmax(x). Nothing (n, V) allocated."""
    top = x.amax(-1, keepdim=True)
    torch.sub(x, top, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return x.sub_(total.log_().add_(top))


def ce_kd_chunk(
    z, targets, rows, owned, weights, temperatures, loss, ce_weight, kd_weight, need_grad, buffers
):
    """CE (T = 1, the student's full width) + `weighted_loss` / `sum` KD over DenseRows, one chunk, closed form.

    z (n, V_s) fp32 student logits, overwritten; rows[i].logits (n, V_t), overwritten when owned[i] (they are
    the caller's buffers), else copied. Teacher i runs at temperatures[i], on the first min(V_s, V_t) columns
    of both sides, as `combined_divergence` does. The returned gradient may live in one of `buffers`: use it
    before the next chunk. For CE at T = 1, ∂CE/∂z = p_s − onehot.
    """
    n, width = z.shape
    p = buffers.take("p", n, width)
    log_p = log_softmax_(z, p)
    ce = -log_p.gather(-1, targets.unsqueeze(-1)).sum()
    # One teacher over the student's full width (the usual case) leaves its gradient in the scratch `a`, where
    # CE's is added at the end; otherwise the teachers' add up in `g`.
    single = len(rows) == 1 and rows[0].width >= width
    grad = None
    if need_grad and rows and not single:
        grad = torch.mul(p, ce_weight, out=buffers.take("g", n, width))
    kd, own = ce.new_zeros(()), []
    for r, is_owned, w, t in zip(rows, owned, weights, temperatures):
        vocab = min(width, r.width)
        lt = r.logits[:, :vocab]
        if not is_owned:  # a caller's tensor, maybe with -inf (banned tokens): copy, floor
            lt = buffers.take("teacher", n, vocab).copy_(lt).clamp_(min=LOGIT_FLOOR)
        if t != 1.0:
            lt.div_(t)
        pt = buffers.take("pt", n, vocab)
        log_softmax_(lt, pt)
        if t == 1.0 and vocab == width:  # CE's log-softmax is this teacher's student side too
            ls, ps = log_p, p
        else:  # log_softmax is shift-invariant: log_p / T gives log_softmax(z / T) on the first `vocab` columns
            ls = torch.div(log_p[:, :vocab], t, out=buffers.take("ls", n, vocab))
            ps = buffers.take("ps", n, vocab)
            log_softmax_(ls, ps)
        a = buffers.take("a", n, vocab)
        per, g, scale = divergence_into(ls, ps, lt, pt, loss.kind, loss.beta, loss.skew_alpha, a, need_grad)
        coefficient = w if loss.combine == "weighted_loss" else 1.0
        own.append(per.sum())
        kd = kd + coefficient * own[-1]
        if g is not None:
            alpha = kd_weight * coefficient * scale / t  # d(z/T)/dz = 1/T
            if single:
                grad = g.mul_(alpha).add_(p, alpha=ce_weight)
            else:
                grad[:, :vocab].add_(g, alpha=alpha)
    if need_grad:
        if grad is None:  # no teacher: CE alone, in place of the probabilities
            grad = p.mul_(ce_weight)
        grad[torch.arange(n, device=z.device), targets] -= ce_weight
    return ChunkSums(ce, kd, own, grad)


def _autograd_chunk(
    z, targets, rows, weights, temperatures, loss, ce_weight, kd_weight, need_grad
) -> ChunkSums:
    """Any combine and any rows (stored sparse rows too): the plain path's own code, differentiated."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(need_grad)
        ce = F.cross_entropy(leaf, targets, reduction="sum")
        kd, own = leaf.new_zeros(()), []
        if rows:
            kd, own = combined_divergence(leaf, rows, weights, temperatures, targets, loss)
        grad = torch.autograd.grad(ce_weight * ce + kd_weight * kd, leaf)[0] if need_grad else None
    return ChunkSums(ce.detach(), kd.detach(), [o.detach() for o in own], grad)


def fused_head_loss(
    hidden: Tensor,
    head: torch.nn.Module,
    targets: Tensor,
    teacher_rows: Sequence[RowSource],
    weights: Sequence[float],
    temperatures: Sequence[float],
    loss,
    on_backward: Callable[[], None] | None = None,
) -> HeadLossSums:
    """CE + KD of the student's head on N label positions, `loss.chunk_size` positions at a time.

    hidden (N, H) the student's final hidden states at the label positions; head its output layer (V_s rows);
    targets (N,) the label tokens; teacher_rows[i] gives teacher i's rows for a slice of the N positions;
    loss the run's KDLoss (objective (1 − kd_ratio)·CE + kd_ratio·KD). Sums, not means: the caller divides by
    the step's token count. Equals CE + `combined_divergence` on full logits; the gradients are computed here,
    during the forward. on_backward: called when backward reaches the loss, before the head's own gradients
    are handed over (a sharded head is gathered there, so that they meet the full parameters).
    """
    if loss.chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {loss.chunk_size}")
    chunk_size, ce_weight, kd_weight = loss.chunk_size, 1.0 - loss.kd_ratio, loss.kd_ratio
    sources = list(teacher_rows) if kd_weight > 0 else []
    student = StudentHead(head, hidden)
    closed_form = loss.combine in ("weighted_loss", "sum")
    shared = [s for s in sources if closed_form and student.linear and s.shared_hidden is not None]
    buffers = ChunkBuffers(min(chunk_size, hidden.shape[0]), hidden.device)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = ce_sum.clone()
    own_sums = [ce_sum.clone() for _ in teacher_rows]
    for start in range(0, hidden.shape[0], chunk_size):
        positions = slice(start, start + chunk_size)
        z, projected = student.logits(
            hidden[positions], [s.shared_hidden[positions] for s in shared], buffers
        )
        rows, owned = [], []  # owned: the rows are a buffer of ours, to overwrite at will
        with torch.no_grad():
            for i, source in enumerate(sources):
                if source in shared:
                    rows.append(DenseRows(projected[shared.index(source)]))
                    owned.append(True)
                    continue
                out = (
                    buffers.take(f"teacher{i}", z.shape[0], source.width)
                    if closed_form and source.width
                    else None
                )
                rows.append(source.fetch(positions, out))
                owned.append(isinstance(rows[-1], DenseRows) and out is not None and rows[-1].logits is out)
            chunk = (z, targets[positions], rows)
            if closed_form and all(isinstance(r, DenseRows) for r in rows):
                sums = ce_kd_chunk(
                    *chunk,
                    owned,
                    weights,
                    temperatures,
                    loss,
                    ce_weight,
                    kd_weight,
                    student.need_grad,
                    buffers,
                )
            else:
                sums = _autograd_chunk(
                    *chunk, weights, temperatures, loss, ce_weight, kd_weight, student.need_grad
                )
        ce_sum += sums.ce
        kd_sum += sums.kd
        for total, value in zip(own_sums, sums.own):
            total += value
        if student.need_grad:
            student.backprop(positions, sums.grad)
    objective = ce_weight * ce_sum + (kd_weight * kd_sum if sources else 0.0)
    return HeadLossSums(student.attach(objective, hidden, on_backward), ce_sum, kd_sum, own_sums)
