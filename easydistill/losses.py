"""Distillation divergences between a student and a teacher distribution over the vocabulary.

Pure tensor code: imports torch only. Conventions (see docs/losses.md for the maths):

- p_T = softmax(teacher_logits / T), p_S = softmax(student_logits / T), computed in fp32 log-space.
- Each divergence is summed over the vocabulary per position; reductions average over positions
  whose label is not -100.
- No T² scaling (GKD / TRL convention); callers that want Hinton's scaling multiply by T² themselves.
- Padded vocabularies: both sides are cut to ``vocab_size`` (default: the smaller last dim) before
  the softmax, so padding rows never receive probability mass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("forward_kld", "reverse_kld", "jsd", "skew_forward_kld", "skew_reverse_kld", "tvd")
REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100
# Logits of -inf (banned tokens) are raised to this finite floor: their probability is still exactly 0,
# but no log-probability is -inf, so a mixture's logsumexp over two -inf entries (whose backward is
# exp(-inf - (-inf)) = NaN) and 0·(−inf) products cannot occur.
_LOGIT_FLOOR = -1e30


def _check_params(kind: str, beta: float, temperature: float, skew_alpha: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def _check_leading(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            "student and teacher logits must agree on every dim but the vocabulary: "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _shared_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None) -> int:
    _check_leading(student_logits, teacher_logits)
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if vocab_size is None:
        return shared
    if not 0 < vocab_size <= shared:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {shared}] (student has "
            f"{student_logits.shape[-1]} columns, teacher {teacher_logits.shape[-1]})"
        )
    return vocab_size


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p (log p − log q) from log-probabilities: (..., V), (..., V) -> (...).

    Both inputs come from ``_log_probs`` and are finite, so a token with p == 0 contributes
    0 · finite = 0 to the value and to the gradient: no 0·log 0 special case is needed.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(logits: Tensor, vocab: int, temperature: float) -> Tensor:
    """(..., V_any) -> (..., vocab) fp32 log-softmax of the temperature-scaled, vocab-cut logits."""
    scaled = (logits[..., :vocab].float() / temperature).clamp(min=_LOGIT_FLOOR)
    return F.log_softmax(scaled, dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) for 0 < w < 1, without leaving log-space: (..., V) -> (..., V)."""
    stacked = torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)])
    return torch.logsumexp(stacked, dim=0)


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

    kind:
      forward_kld       KL(p_T ‖ p_S)
      reverse_kld       KL(p_S ‖ p_T)
      jsd               β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m), m = β·p_T + (1−β)·p_S (GKD / TRL
                        generalized JSD). The mixture formula is 0 at β ∈ {0, 1}, so the endpoints
                        are defined as the KLs instead: β=0 returns forward_kld exactly, β=1
                        returns reverse_kld exactly.
      skew_forward_kld  KL(p_T ‖ α·p_T + (1−α)·p_S), α = skew_alpha (DistiLLM); α=0 is forward_kld.
      skew_reverse_kld  KL(p_S ‖ α·p_S + (1−α)·p_T); α=0 is reverse_kld.
      tvd               ½·Σ|p_T − p_S|

    Logits are divided by ``temperature`` before the softmax; the result is NOT multiplied by T².
    Both sides are cut to ``vocab_size`` (default min(V_s, V_t)) before the softmax. Inputs may be
    bf16/fp16; the maths runs in fp32. The teacher is not detached here: callers decide.
    """
    _check_params(kind, beta, temperature, skew_alpha)
    vocab = _shared_vocab(student_logits, teacher_logits, vocab_size)
    log_s = _log_probs(student_logits, vocab, temperature)
    log_t = _log_probs(teacher_logits, vocab, temperature)

    if kind == "forward_kld" or (kind == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if kind == "reverse_kld" or (kind == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mixture(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if kind == "skew_forward_kld":
        # The mixture would need log(0) at α=0; the plain KL is its exact value there.
        if skew_alpha == 0.0:
            return _kl(log_t, log_s)
        return _kl(log_t, _log_mixture(log_t, log_s, skew_alpha))
    if kind == "skew_reverse_kld":
        if skew_alpha == 0.0:
            return _kl(log_s, log_t)
        return _kl(log_s, _log_mixture(log_s, log_t, skew_alpha))
    # tvd: |p_T − p_S| needs probabilities; exp of a log_softmax is bounded, so no overflow.
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


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
    reduction:
      'mean'  average over unmasked positions; 0 when there are none, with zero gradients.
      'sum'   sum over unmasked positions.
      'none'  (...) per position, masked positions set to 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    options = dict(beta=beta, temperature=temperature, skew_alpha=skew_alpha, vocab_size=vocab_size)
    if mask is None:
        per = per_token_divergence(student_logits, teacher_logits, kind, **options)
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.mean()

    _check_leading(student_logits, teacher_logits)
    leading = student_logits.shape[:-1]
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != leading:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match logits leading shape {tuple(leading)}"
        )

    # Only the counted rows go through the softmax: prompts are masked, so this usually skips a
    # large share of the (…, V) work, and masked rows can never inject NaN into the gradients.
    per = per_token_divergence(student_logits[mask], teacher_logits[mask], kind, **options)  # (N,)
    if reduction == "none":
        out = per.new_zeros(leading)
        out[mask] = per
        return out
    total = per.sum()
    if reduction == "sum":
        return total
    # clamp keeps an all-masked batch at 0/1 = 0 instead of 0/0 = NaN.
    return total / mask.sum().clamp(min=1)


def token_sums(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    kind: str,
    *,
    beta: float,
    temperature: float,
    skew_alpha: float = 0.1,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-micro-batch sums for the CE/KD mix; the trainer normalises over the whole optimizer step.

    student_logits (B, T, V_s), labels (B, T) with -100 for ignored positions, teacher_logits
    (B, T, V_t) or None. HF causal-LM alignment: logits at position t predict token t+1, so the
    sums use logits[:, :-1] against labels[:, 1:].

    Returns (ce_sum, kd_sum, n_tokens):
      ce_sum    fp32 scalar, cross-entropy summed over valid positions, on the student's full
                (not vocab-cut) logits at temperature 1.
      kd_sum    fp32 scalar, the divergence summed over the same positions (0 if no teacher).
      n_tokens  int64 scalar, count of labels[:, 1:] != -100.

    The caller computes ((1 − kd_ratio)·ce_sum + kd_ratio·kd_sum) / N_step, with N_step the valid
    token count of the whole optimizer step (all micro-batches, all ranks).
    """
    _check_params(kind, beta, temperature, skew_alpha)
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected student_logits (B, T, V) and labels (B, T), got {tuple(student_logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if teacher_logits is not None and teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must share (B, T) with student_logits "
            f"{tuple(student_logits.shape)}"
        )

    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    n_tokens = mask.sum()
    # Selecting the rows first keeps the fp32 copy of the logits to the counted positions only.
    student_rows = student_logits[:, :-1][mask]  # (N, V_s)
    ce_sum = F.cross_entropy(student_rows.float(), targets[mask], reduction="sum")

    if teacher_logits is None:
        kd_sum = ce_sum.new_zeros(())
    else:
        teacher_rows = teacher_logits[:, :-1][mask]  # (N, V_t)
        kd_sum = per_token_divergence(
            student_rows,
            teacher_rows,
            kind,
            beta=beta,
            temperature=temperature,
            skew_alpha=skew_alpha,
            vocab_size=vocab_size,
        ).sum()
    return ce_sum, kd_sum, n_tokens
