"""Distillation divergences: ONE table of the six kinds, each with its value and closed-form gradient side by side.

Pure tensor code: imports torch only. Conventions (docs/losses.md has the maths):

- p_T = softmax(teacher_logits / T), p_S = softmax(student_logits / T), in log-space, fp32 unless the caller
  hands over fp64 log-probabilities.
- Each divergence is summed over the categories per position (the vocabulary for dense teacher rows, the k
  stored ids + one tail bucket for stored rows, loss/rows.py); reductions average over positions whose
  label is not -100. No T² scaling (GKD / TRL convention).
- The teacher is a constant target: no gradient flows into it.

Both loss paths read `TABLE`: the plain path through `of_log_probs` (a torch.autograd.Function whose backward
is the table's gradient), the fused path (loss/chunked.py) through `divergence_into` on its reused buffers.
For a kind D that depends on the student only through p_s = softmax(x), x = z / T, with G = ∂D/∂p_s:

    ∂D/∂x = p_s ⊙ (G − ⟨p_s, G⟩)

so each kind only needs its G. Stored rows hand over the student's log-probabilities collapsed onto K + 1
categories; they are normalised, so treating them as the logits x of a (K + 1)-way softmax gives the right
chain-rule gradient through the collapse (a constant shift of ∂D/∂x is annihilated by the softmax below).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100
# Logits of -inf (banned tokens) are raised to this finite floor: their probability is still exactly 0, but no
# log-probability is -inf, so no 0·(−inf) product and no logsumexp over two -inf entries (NaN backward) occurs.
LOGIT_FLOOR = -1e30


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """(n, C), (n, C) -> (n,) row-wise ⟨x, y⟩; on the CPU one dot per row, without an (n, C) temporary (a
    152k-wide temporary per chunk costs more in page faults than the arithmetic; 480 × 32k rows: 0.05 s by dots,
    0.11 s by einsum, 0.32 s by (x * y).sum(-1) on one thread here)."""
    if x.device.type != "cpu":
        return (x * y).sum(-1)  # accelerators' caching allocators make the temporary cheap
    return x.new_zeros(0) if x.shape[0] == 0 else torch.stack([torch.dot(a, b) for a, b in zip(x, y)])


def _log_mixture_into(out: Tensor, p: Tensor, q: Tensor, w: float) -> Tensor:
    """out = log(m / w), m = w·p + (1−w)·q, 0 < w < 1, floored at the smallest normal float before the log
    so that it stays finite where both distributions underflow (their terms are 0 there either way)."""
    return torch.add(p, q, alpha=(1.0 - w) / w, out=out).clamp_(min=torch.finfo(out.dtype).tiny).log_()


# ---------------------------------------------------------------- the table
# Each kind: (ls, ps, lt, pt, a, beta, alpha, need_grad) -> (D per position (n,), g (n, C) or None, scale) with
# ∂D/∂x = scale · g. ls/ps, lt/pt: student and teacher log-probabilities and probabilities (n, C); `a` scratch
# (n, C) that g may occupy; lt and pt may be overwritten, ls and ps are not. Sums take p·(log p − log q)
# elementwise, never Σ p log p − Σ p log q: two entropies of a 100k-token vocabulary would cancel to a small
# divergence with fp32 rounding left over.


def _forward_kld(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s).    ∂D/∂x = p_s − p_t."""
    per = _rowdot(pt, torch.sub(lt, ls, out=a))
    return per, (torch.sub(ps, pt, out=a) if need_grad else None), 1.0


def _reverse_kld(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t).    G = log p_s − log p_t + 1, so ∂D/∂x = p_s (G − D − 1)."""
    per = _rowdot(ps, torch.sub(ls, lt, out=a))
    return per, (a.sub_(per.unsqueeze(-1)).mul_(ps) if need_grad else None), 1.0


def _jsd(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m), m = β p_t + (1−β) p_s (GKD / TRL generalized JSD).
    G = (1−β)(log p_s − log m); the mixture terms of G cancel. β = 0 and β = 1 are the KLs (`resolve`)."""
    log_w = math.log(beta)
    _log_mixture_into(a, pt, ps, beta)  # log m − log β
    kl_t = _rowdot(pt, lt.sub_(a)) - log_w
    c = _rowdot(ps, torch.sub(ls, a, out=a))  # KL(p_s ‖ m) + log β
    per = beta * kl_t + (1.0 - beta) * (c - log_w)
    return per, (a.sub_(c.unsqueeze(-1)).mul_(ps) if need_grad else None), 1.0 - beta


def _skew_forward_kld(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """KL(p_t ‖ m), m = α p_t + (1−α) p_s (DistiLLM).    G = −(1−α) p_t / m."""
    _log_mixture_into(a, pt, ps, alpha)  # log m − log α
    per = _rowdot(pt, torch.sub(lt, a, out=a)) - math.log(alpha)
    if not need_grad:
        return per, None, 1.0
    return per, _softmax_grad(a.exp_(), ps), -(1.0 - alpha) / alpha  # a = α p_t / m


def _skew_reverse_kld(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """KL(p_s ‖ m), m = α p_s + (1−α) p_t.    G = log(p_s / m) + 1 − α p_s / m."""
    _log_mixture_into(a, ps, pt, alpha)  # log m − log α
    per = _rowdot(ps, torch.sub(ls, a, out=a)) - math.log(alpha)  # a = log(α p_s / m)
    if not need_grad:
        return per, None, 1.0
    return per, _softmax_grad(a.sub_(torch.exp(a, out=pt)), ps), 1.0  # G up to constants, which drop out


def _tvd(ls, ps, lt, pt, a, beta, alpha, need_grad):
    """½ Σ |p_t − p_s|.    G = ½ sign(p_s − p_t)."""
    torch.sub(ps, pt, out=a)
    per = 0.5 * torch.abs(a, out=pt).sum(-1)
    return per, (_softmax_grad(a.sign_(), ps) if need_grad else None), 0.5


def _softmax_grad(g: Tensor, ps: Tensor) -> Tensor:
    """In place: G (n, C) -> p_s ⊙ (G − ⟨p_s, G⟩), the gradient w.r.t. the softmax's logits."""
    return g.sub_(_rowdot(ps, g).unsqueeze(-1)).mul_(ps)


TABLE = {
    "forward_kld": _forward_kld,
    "reverse_kld": _reverse_kld,
    "jsd": _jsd,
    "skew_forward_kld": _skew_forward_kld,
    "skew_reverse_kld": _skew_reverse_kld,
    "tvd": _tvd,
}
KINDS = tuple(TABLE)


def check_params(kind: str, beta: float, temperature: float, skew_alpha: float) -> None:
    if kind not in TABLE:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def resolve(kind: str, beta: float, skew_alpha: float) -> str:
    """The endpoints are the KLs exactly: jsd at β = 0 is forward KL, at β = 1 reverse KL; a skew at α = 0 is
    its plain KL (the mixture formulas would divide by 0 there)."""
    if kind == "jsd" and beta == 0.0 or kind == "skew_forward_kld" and skew_alpha == 0.0:
        return "forward_kld"
    if kind == "jsd" and beta == 1.0 or kind == "skew_reverse_kld" and skew_alpha == 0.0:
        return "reverse_kld"
    return kind


def divergence_into(
    ls, ps, lt, pt, kind, beta, skew_alpha, a, need_grad
) -> tuple[Tensor, Tensor | None, float]:
    """The table's entry for `kind` on (n, C) buffers: (D (n,), g or None, scale) with ∂D/∂x = scale · g."""
    return TABLE[resolve(kind, beta, skew_alpha)](ls, ps, lt, pt, a, beta, skew_alpha, need_grad)


class _TableDivergence(torch.autograd.Function):
    """Forward: the table's value; backward: the table's gradient (saved by the forward), times grad_output."""

    @staticmethod
    def forward(ctx, log_s: Tensor, log_t: Tensor, kind: str, beta: float, skew_alpha: float) -> Tensor:
        ls, lt = log_s.detach(), log_t.detach().clone()  # the table may overwrite lt and pt
        need = ctx.needs_input_grad[0]
        per, g, scale = divergence_into(
            ls, ls.exp(), lt, lt.exp(), kind, beta, skew_alpha, torch.empty_like(ls), need
        )
        ctx.save_for_backward(g.mul_(scale) if need else None)
        return per

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (g,) = ctx.saved_tensors
        return g * grad_out.unsqueeze(-1), None, None, None, None


def of_log_probs(log_s: Tensor, log_t: Tensor, kind: str, beta: float, skew_alpha: float) -> Tensor:
    """(..., C), (..., C) normalised, finite log-probabilities of the student and the teacher -> (...) divergence,
    differentiable w.r.t. log_s (the student's log_softmax output) through the table's closed form."""
    leading = log_s.shape[:-1]
    flat = _TableDivergence.apply(
        log_s.reshape(-1, log_s.shape[-1]), log_t.reshape(-1, log_t.shape[-1]), kind, beta, skew_alpha
    )
    return flat.reshape(leading)


# ---------------------------------------------------------------- dense logits


def log_probs(logits: Tensor, vocab: int, temperature: float) -> Tensor:
    """(..., V_any) -> (..., vocab) fp32 log-softmax of the temperature-scaled, vocab-cut logits."""
    scaled = (logits[..., :vocab].float() / temperature).clamp(min=LOGIT_FLOOR)
    return F.log_softmax(scaled, dim=-1)


def shared_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(..., V_s), (..., V_t) -> both sides' log-probabilities on the first `vocab_size` (default min(V_s, V_t))
    columns: padding rows of an embedding matrix never receive probability mass."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            "student and teacher logits must agree on every dim but the vocabulary: "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    vocab = shared if vocab_size is None else vocab_size
    if not 0 < vocab <= shared:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {shared}] (student has "
            f"{student_logits.shape[-1]} columns, teacher {teacher_logits.shape[-1]})"
        )
    return log_probs(student_logits, vocab, temperature), log_probs(teacher_logits, vocab, temperature)


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    vocab_size: int | None = None,
) -> Tensor:
    """(..., V_s), (..., V_t) -> (...) divergence per position, summed over the vocabulary, in fp32.

    kind (see TABLE): forward_kld KL(p_T‖p_S); reverse_kld KL(p_S‖p_T); jsd β·KL(p_T‖m) + (1−β)·KL(p_S‖m),
    m = β·p_T + (1−β)·p_S (β=0 is exactly forward_kld, β=1 exactly reverse_kld); skew_forward_kld
    KL(p_T‖α·p_T + (1−α)·p_S); skew_reverse_kld KL(p_S‖α·p_S + (1−α)·p_T), α = skew_alpha; tvd ½·Σ|p_T − p_S|.
    Logits are divided by ``temperature`` before the softmax; the result is NOT multiplied by T². Inputs may be
    bf16/fp16; the maths runs in fp32.
    """
    check_params(kind, beta, temperature, skew_alpha)
    log_s, log_t = shared_log_probs(student_logits, teacher_logits, temperature, vocab_size)
    return of_log_probs(log_s, log_t, kind, beta, skew_alpha)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """(..., V_s), (..., V_t) -> reduced divergence, fp32 (see ``per_token_divergence``).

    mask: bool (...), True where the position counts (label != -100); None counts every position.
    reduction: 'mean' over unmasked positions (0 with zero gradients when there are none), 'sum', or 'none'
    ((...) per position, masked positions 0).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    options = dict(beta=beta, temperature=temperature, skew_alpha=skew_alpha, vocab_size=vocab_size)
    if mask is None:
        per = per_token_divergence(student_logits, teacher_logits, kind, **options)
        return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]
    leading = student_logits.shape[:-1]
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != leading:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match logits leading shape {tuple(leading)}"
        )
    if teacher_logits.shape[:-1] != leading:
        shared_log_probs(student_logits, teacher_logits, temperature)  # raises the shape error
    # Only the counted rows go through the softmax: prompts are masked, so this usually skips a large share of
    # the (…, V) work, and masked rows can never inject NaN into the gradients.
    per = per_token_divergence(student_logits[mask], teacher_logits[mask], kind, **options)  # (N,)
    if reduction == "none":
        return per.new_zeros(leading).index_put_((mask,), per)
    total = per.sum()
    # clamp keeps an all-masked batch at 0/1 = 0 instead of 0/0 = NaN.
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)
