"""Combining several teachers' distributions into one KD term (pure tensor code).

Shapes: the student's rows (N, V_s) and each teacher's rows (loss/rows.py: DenseRows or SparseRows) describe
the same N label positions. `loss` is the run's KDLoss (config/view.py), read for kind, beta, skew_alpha,
combine and temperature (the student's, for `mixture`); each teacher brings its weight w_i and temperature.

combine:
- weighted_loss: Σ_i w_i · D(p_i, q)             (default; one teacher: D(p, q))
- mixture:       D(Σ_i w_i · p_i, q)              (the student matches the averaged distribution)
- sum:           Σ_i D(p_i, q)                    (EasyDistill v1, weights ignored)
- confidence:    Σ_i c_i(t) · D_i(t) per token, c_i(t) ∝ w_i · p_i(gold token at t)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from easydistill.loss.divergence import of_log_probs, shared_log_probs

COMBINES = ("weighted_loss", "mixture", "sum", "confidence")


def _per_token(student: Tensor, rows, temperature: float, loss) -> Tensor:
    """(N,) D(p_teacher, q_student) at the teacher's temperature."""
    log_s, log_t = rows.log_probs_pair(student, temperature)
    return of_log_probs(log_s, log_t, loss.kind, loss.beta, loss.skew_alpha)


def _mixture(student, teacher_rows, weights, temperatures, loss) -> Tensor:
    width = min([student.shape[-1]] + [r.width for r in teacher_rows])
    # log Σ w_i p_i, computed stably; dividing by T below undoes the multiplication by T here.
    stacked = torch.stack(
        [
            math.log(w) + r.dense_log_probs(width, t)
            for r, w, t in zip(teacher_rows, weights, temperatures)
            if w > 0
        ]
    )
    mixed = torch.logsumexp(stacked, dim=0) * loss.temperature
    log_s, log_t = shared_log_probs(student, mixed, loss.temperature)
    return of_log_probs(log_s, log_t, loss.kind, loss.beta, loss.skew_alpha).sum()


def combined_divergence(
    student: Tensor,
    teacher_rows: list,
    weights: list[float],
    temperatures: list[float],
    targets: Tensor,
    loss,
) -> tuple[Tensor, list[Tensor]]:
    """(KD summed over the N positions, [each teacher's own divergence summed over them]).

    The per-teacher sums are for logging (`kd_loss/<name>`); only the first value carries the gradient in
    `mixture` mode, where the per-teacher values are computed without it.
    """
    if loss.combine not in COMBINES:
        raise ValueError(f"unknown combine {loss.combine!r}; expected one of {', '.join(COMBINES)}")
    if loss.combine == "mixture":
        with torch.no_grad():
            own = [_per_token(student, r, t, loss).sum() for r, t in zip(teacher_rows, temperatures)]
        return _mixture(student, teacher_rows, weights, temperatures, loss), own
    per_token = [_per_token(student, r, t, loss) for r, t in zip(teacher_rows, temperatures)]
    own = [d.detach().sum() for d in per_token]
    if loss.combine == "sum":
        return torch.stack(per_token).sum(), own
    if loss.combine == "weighted_loss":
        return sum(w * d.sum() for w, d in zip(weights, per_token)), own
    # confidence: per-position weights from how much each teacher believes the gold token, times w_i.
    with torch.no_grad():
        gold = torch.stack(
            [r.gold_log_prob(targets, t) for r, t in zip(teacher_rows, temperatures)]
        )  # (K, N)
        log_w = torch.tensor(weights, device=gold.device).clamp_min(1e-30).log().unsqueeze(-1)
        position_weights = torch.softmax(gold + log_w, dim=0)  # (K, N), sums to 1 over teachers
    return (position_weights * torch.stack(per_token)).sum(), own
