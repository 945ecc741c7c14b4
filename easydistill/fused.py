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

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.kd_gradients import ChunkBuffers, ChunkSums, ce_kd_chunk
from easydistill.teachers.ensemble import combined_divergence
from easydistill.teachers.online import final_hidden_states

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
