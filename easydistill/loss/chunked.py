"""The KD step's loss without (tokens × vocab) logits: the LM head, CE and the divergence, a chunk at a time.

For a 152k vocabulary the logits dominate a KD step: 4 × 2048 label positions are ~5 GB of fp32 logits per
model before any softmax. `kd_step_sums` (what KDTrainer.compute_loss calls) computes a step's sums in one
of two ways:

- plain (`chunk_size` 0): logits only where labels are (a boolean `logits_to_keep` mask for the student,
  `hidden_rows` + `head_logits` for the teachers), then CE and `combined_divergence` as before.
- fused (`chunk_size` > 0, `fused_head_loss`): the final hidden states at the label positions, then for each
  chunk of positions the student's and every teacher's logits, CE + KD, and at once the gradient of that
  chunk's objective w.r.t. its logits, turned into the gradient of the hidden rows (and of the head weight
  when it trains) before the logits are dropped. Backward only scales the stored gradients
  (`_PrecomputedGrad`): nothing is recomputed, and one chunk of logits per model is alive at a time.

Dense teachers with `weighted_loss` / `sum` take closed-form gradients (kd_gradients.py); stored sparse rows,
`mixture` and `confidence` take autograd on the chunk's logits through the plain path's own code
(teachers/ensemble.py), so every combination is covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.loss.closed_form import ChunkBuffers, ChunkSums, ce_kd_chunk
from easydistill.loss.combine import combined_divergence

# ---------------------------------------------------------------- the fused head loss


class _PrecomputedGrad(torch.autograd.Function):
    """Forward: the objective computed, with its gradients, beforehand. Backward: those gradients of `inputs`
    times grad_output; nothing is recomputed."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None  # scaled in place and handed over: no second copy of dW
        return (None, None, *(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads))


@dataclass(eq=False)  # compared by identity
class RowSource:
    """One teacher's rows for a slice of the N label positions: `fetch(positions, out)` gives (n, V_t) logits
    (into `out`, an (n, width) fp32 buffer, when it can: check the result) or stored sparse rows. `width` is
    the width of projected logits, None for rows that are not projected here."""

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


class _StudentHead:
    """The student's output layer in the fused loop: chunk logits into a buffer, chunk gradients into the
    hidden rows' and the trainable head parameters' gradient accumulators.

    A plain Linear head is applied and differentiated by hand (dW accumulated with addmm_, no (V, H)
    temporary per chunk); any other head (a LoRA'd head, a modules_to_save copy) by its own forward and
    autograd on the chunk."""

    def __init__(self, head: torch.nn.Module, hidden: Tensor):
        self.head, self.linear = head, type(head) is torch.nn.Linear
        candidates = [head.weight, head.bias] if self.linear else list(head.parameters())
        self.params = [p for p in candidates if p is not None and p.requires_grad]
        self.dtype = head.weight.dtype if self.linear else next(head.parameters()).dtype
        self.need_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(self.params))
        self.grad_hidden = torch.zeros_like(hidden) if self.need_grad and hidden.requires_grad else None
        self.param_grads = (
            [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if self.need_grad else []
        )
        self._h, self._z = None, None

    def logits(self, h: Tensor, extra: list[Tensor], buffers: ChunkBuffers) -> tuple[Tensor, list[Tensor]]:
        """(n, H) hidden rows (+ teachers' rows sharing this head) -> (n, V) fp32 logits in a buffer, and the
        sharing teachers' (n, V) logits."""
        # Mixed precision may hand over fp32 hidden states (accelerate converts outputs) for a bf16 head.
        h = self._h = h.detach().to(self.dtype)
        n = h.shape[0]
        if not self.linear:
            with torch.set_grad_enabled(self.need_grad):
                self._h = h.requires_grad_(self.grad_hidden is not None)
                self._z = self.head(self._h)
            return buffers.take("z", n, self._z.shape[-1]).copy_(self._z.detach()), []
        weight, bias = self.head.weight, self.head.bias
        stacked = torch.cat([h] + [e.to(self.dtype) for e in extra]) if extra else h
        out = buffers.take("z", stacked.shape[0], weight.shape[0], rows=buffers.rows * (1 + len(extra)))
        with torch.no_grad():
            if weight.dtype == torch.float32:
                torch.mm(stacked, weight.t(), out=out)
                if bias is not None:
                    out.add_(bias)
            else:
                out.copy_(F.linear(stacked, weight, bias))
        return out[:n], [out[n * (j + 1) : n * (j + 2)] for j in range(len(extra))]

    def backprop(self, positions: slice, grad: Tensor) -> None:
        """Turn the chunk's ∂objective/∂logits (n, V) into the hidden rows' and the parameters' gradients."""
        if not self.linear:
            wrt = ([self._h] if self.grad_hidden is not None else []) + self.params
            grads = torch.autograd.grad(self._z, wrt, grad_outputs=grad.to(self._z.dtype), allow_unused=True)
            if self.grad_hidden is not None:
                self.grad_hidden[positions], grads = grads[0], grads[1:]
            for acc, g in zip(self.param_grads, grads):
                if g is not None:
                    acc += g
            return
        weight = self.head.weight
        with torch.no_grad():
            g = grad.to(weight.dtype)
            if self.grad_hidden is not None and self.grad_hidden.dtype == g.dtype:
                torch.mm(g, weight, out=self.grad_hidden[positions])  # (n, H)
            elif self.grad_hidden is not None:
                self.grad_hidden[positions] = g @ weight
            for p, acc in zip(self.params, self.param_grads):
                if p is weight:
                    acc.addmm_(grad.t(), self._h.float())  # (V, n) @ (n, H)
                else:
                    acc += grad.sum(0)

    def attach(self, objective: Tensor, hidden: Tensor) -> Tensor:
        """The objective as a function of the hidden rows and the head, with the gradients gathered."""
        if not self.need_grad:
            return objective
        inputs = ([hidden] if self.grad_hidden is not None else []) + self.params
        grads = ([self.grad_hidden] if self.grad_hidden is not None else []) + [
            g.to(p.dtype) for g, p in zip(self.param_grads, self.params)
        ]
        return _PrecomputedGrad.apply(objective, grads, *inputs)


def _autograd_chunk(
    z, targets, rows, weights, temperatures, opts, ce_weight, kd_weight, need_grad
) -> ChunkSums:
    """Any combine and any rows (stored sparse rows too): the plain path's own code, differentiated."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(need_grad)
        ce = F.cross_entropy(leaf, targets, reduction="sum")
        kd, own = leaf.new_zeros(()), []
        if rows:
            kd, own = combined_divergence(leaf, rows, weights, temperatures, targets, **opts)
        grad = torch.autograd.grad(ce_weight * ce + kd_weight * kd, leaf)[0] if need_grad else None
    return ChunkSums(ce.detach(), kd.detach(), [o.detach() for o in own], grad)


def _as_source(source) -> RowSource:
    if isinstance(source, RowSource):
        return source
    return RowSource(lambda positions, out, fetch=source: fetch(positions))


def fused_head_loss(
    hidden: Tensor,
    head: torch.nn.Module,
    targets: Tensor,
    teacher_rows: Sequence[RowSource | Callable[[slice], Any]] = (),
    weights: Sequence[float] = (),
    temperatures: Sequence[float] = (),
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    combine: str = "weighted_loss",
    kind: str = "forward_kld",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    student_temperature: float = 1.0,
    chunk_size: int = 64,
) -> HeadLossSums:
    """CE + KD of the student's head on N label positions, `chunk_size` positions at a time.

    hidden (N, H) the student's final hidden states at the label positions; head its output layer (V_s rows);
    targets (N,) the label tokens; teacher_rows[i] gives teacher i's rows for a slice of the N positions, as
    a `RowSource` or a callable positions -> (n, V_t) logits or stored sparse rows (anything
    `combined_divergence` takes). Sums, not means: the caller divides by the step's token count. Equals CE
    + `combined_divergence` on full logits; the gradients are computed here, during the forward.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    sources = [_as_source(s) for s in teacher_rows] if kd_weight > 0 else []
    student = _StudentHead(head, hidden)
    closed_form = combine in ("weighted_loss", "sum")
    options = dict(combine=combine, kind=kind, beta=beta, skew_alpha=skew_alpha)
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
        n = z.shape[0]
        rows, owned = [], []  # owned: the rows are a buffer of ours, to overwrite at will
        with torch.no_grad():
            for i, source in enumerate(sources):
                if source in shared:
                    rows.append(projected[shared.index(source)])
                    owned.append(True)
                    continue
                out = buffers.take(f"teacher{i}", n, source.width) if closed_form and source.width else None
                rows.append(source.fetch(positions, out))
                owned.append(out is not None and rows[-1] is out)
            chunk_targets = targets[positions]
            if closed_form and all(torch.is_tensor(r) for r in rows):
                sums = ce_kd_chunk(
                    z,
                    chunk_targets,
                    rows,
                    owned,
                    weights,
                    temperatures,
                    **options,
                    ce_weight=ce_weight,
                    kd_weight=kd_weight,
                    need_grad=student.need_grad,
                    buffers=buffers,
                )
            else:
                options_all = {**options, "student_temperature": student_temperature}
                sums = _autograd_chunk(
                    z,
                    chunk_targets,
                    rows,
                    weights,
                    temperatures,
                    options_all,
                    ce_weight,
                    kd_weight,
                    student.need_grad,
                )
        ce_sum += sums.ce
        kd_sum += sums.kd
        for total, value in zip(own_sums, sums.own):
            total += value
        if student.need_grad:
            student.backprop(positions, sums.grad)
    objective = ce_weight * ce_sum + (kd_weight * kd_sum if sources else 0.0)
    return HeadLossSums(student.attach(objective, hidden), ce_sum, kd_sum, own_sums)
