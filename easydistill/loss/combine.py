"""Combining several teachers' distributions into one KD term (pure tensor code).

Shapes: the student's rows (N, V_s) and each teacher's rows (N, V_t) describe the same N label positions.
A teacher's rows are dense logits, or any object with the same methods as the sparse rows of stored
teachers (`per_token_divergence`, `gold_log_prob`, `dense_log_probs`).

combine:
- weighted_loss: Σ_i w_i · D(p_i, q)             (default; one teacher: D(p, q))
- mixture:       D(Σ_i w_i · p_i, q)              (the student matches the averaged distribution)
- sum:           Σ_i D(p_i, q)                    (EasyDistill v1, weights ignored)
- confidence:    Σ_i c_i(t) · D_i(t) per token, c_i(t) ∝ w_i · p_i(gold token at t)
"""

from __future__ import annotations

import math

import torch

from easydistill.loss import divergence as losses

COMBINES = ("weighted_loss", "mixture", "sum", "confidence")


def _per_token(student, rows, kind, *, beta, temperature, skew_alpha) -> torch.Tensor:
    if torch.is_tensor(rows):
        return losses.per_token_divergence(
            student, rows, kind, beta=beta, temperature=temperature, skew_alpha=skew_alpha
        )
    return rows.per_token_divergence(student, kind, beta=beta, temperature=temperature, skew_alpha=skew_alpha)


def _log_probs(rows, width: int, temperature: float) -> torch.Tensor:
    """(N, width) teacher log-probabilities after the temperature."""
    if torch.is_tensor(rows):
        return torch.log_softmax(rows[:, :width].float() / temperature, dim=-1)
    return rows.dense_log_probs(width, temperature)


def _gold_log_prob(rows, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) log-probability each teacher row gives the label token (-inf past its vocabulary)."""
    if not torch.is_tensor(rows):
        return rows.gold_log_prob(targets, temperature)
    log_p = torch.log_softmax(rows.float() / temperature, dim=-1)
    inside = targets < rows.shape[-1]
    gathered = log_p.gather(-1, targets.clamp(max=rows.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, gathered, torch.full_like(gathered, -math.inf))


def combined_divergence(
    student: torch.Tensor,
    teacher_rows: list,
    weights: list[float],
    temperatures: list[float],
    targets: torch.Tensor,
    *,
    combine: str = "weighted_loss",
    kind: str = "forward_kld",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    student_temperature: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(KD summed over the N positions, [each teacher's own divergence summed over them]).

    The per-teacher sums are for logging (`kd_loss/<name>`); only the first value carries the gradient in
    `mixture` mode, where the per-teacher values are computed without it.
    """
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; expected one of {', '.join(COMBINES)}")
    opts = {"beta": beta, "skew_alpha": skew_alpha}
    if combine == "mixture":
        with torch.no_grad():
            own = [
                _per_token(student, r, kind, temperature=t, **opts).sum()
                for r, t in zip(teacher_rows, temperatures)
            ]
        width = min(
            [student.shape[-1]] + [r.shape[-1] if torch.is_tensor(r) else r.vocab_width for r in teacher_rows]
        )
        # log Σ w_i p_i, computed stably; dividing by T below undoes the multiplication by T here.
        stacked = torch.stack(
            [
                math.log(w) + _log_probs(r, width, t)
                for r, w, t in zip(teacher_rows, weights, temperatures)
                if w > 0
            ]
        )
        mixed = torch.logsumexp(stacked, dim=0) * student_temperature
        kd = losses.per_token_divergence(student, mixed, kind, temperature=student_temperature, **opts).sum()
        return kd, own
    per_token = [
        _per_token(student, r, kind, temperature=t, **opts) for r, t in zip(teacher_rows, temperatures)
    ]
    own = [d.detach().sum() for d in per_token]
    if combine == "sum":
        return torch.stack(per_token).sum(), own
    if combine == "weighted_loss":
        return sum(w * d.sum() for w, d in zip(weights, per_token)), own
    # confidence: per-position weights from how much each teacher believes the gold token, times w_i.
    with torch.no_grad():
        gold = torch.stack(
            [_gold_log_prob(r, targets, t) for r, t in zip(teacher_rows, temperatures)]
        )  # (K, N)
        log_w = torch.tensor(weights, device=gold.device).clamp_min(1e-30).log().unsqueeze(-1)
        position_weights = torch.softmax(gold + log_w, dim=0)  # (K, N), sums to 1 over teachers
    return (position_weights * torch.stack(per_token)).sum(), own
