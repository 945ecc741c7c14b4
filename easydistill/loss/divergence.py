"""Distillation divergences between a student and a teacher distribution over the vocabulary.

Pure tensor code: imports torch only. Conventions (see docs/losses.md for the maths):

- p_T = softmax(teacher_logits / T), p_S = softmax(student_logits / T), computed in fp32 log-space.
- Each divergence is summed over the vocabulary per position; reductions average over positions
  whose label is not -100.
- No T² scaling (GKD / TRL convention); callers that want Hinton's scaling multiply by T² themselves.
- Padded vocabularies: both sides are cut to ``vocab_size`` (default: the smaller last dim) before
  the softmax, so padding rows never receive probability mass.
- Stored (top-k) teachers: ``SparseRows`` offers the same divergences on the k stored ids + one tail
  bucket, the student collapsed onto them (docs/losses.md, "Sparse (top-k) teachers").
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
    return _divergence_of_log_probs(log_s, log_t, kind, beta, skew_alpha)


def _divergence_of_log_probs(
    log_s: Tensor, log_t: Tensor, kind: str, beta: float, skew_alpha: float
) -> Tensor:
    """(..., C), (..., C) finite log-probabilities of the student and the teacher -> (...) divergence.

    C is the vocabulary for dense rows, or the k stored ids + one tail bucket for sparse rows.
    """
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


# ---------------------------------------------------------------- sparse (top-k) teachers


class SparseRows:
    """Stored teacher rows: for each of N positions the k most likely token ids plus one tail bucket.

    ids        (N, K) int64 token ids; -1 marks an unused slot (a row that stored fewer than K ids)
    log_probs  (N, K) the teacher's raw log-probabilities of those ids: log_softmax of its logits at
               temperature 1 over the first `vocab_width` columns (any float dtype; fp16 on disk)
    tail       (N,) log of the mass outside the stored ids, log(1 − Σ p_k); -inf when nothing is left

    Divergences are taken between two distributions over the same K + 1 categories (the K ids and the
    tail): the teacher's stored one, and the student's collapsed onto the same ids plus its own remaining
    mass. At temperature T the teacher's K + 1 log-masses are divided by T and renormalised; the tail is
    treated as one token, which is exact at T = 1 or when the tail is empty (k = V), approximate otherwise
    (see docs/losses.md, "Sparse (top-k) teachers"). The same methods as dense rows are offered to
    teachers/ensemble.py; nothing here builds a (batch, seq, vocab) tensor.
    """

    def __init__(self, ids: Tensor, log_probs: Tensor, tail: Tensor, vocab_width: int):
        if ids.dim() != 2 or log_probs.shape != ids.shape or tail.shape != ids.shape[:1]:
            raise ValueError(
                f"expected ids (N, K), log_probs (N, K), tail (N,); got {tuple(ids.shape)}, "
                f"{tuple(log_probs.shape)}, {tuple(tail.shape)}"
            )
        if ids.numel() and int(ids.max()) >= vocab_width:
            raise ValueError(f"a stored token id ({int(ids.max())}) is outside vocab_width={vocab_width}")
        self.ids, self.log_probs, self.tail = ids.long(), log_probs, tail
        self.vocab_width = int(vocab_width)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> SparseRows:
        """A subset of the positions (a slice, index tensor or bool mask over N), e.g. for chunked losses."""
        return SparseRows(self.ids[rows], self.log_probs[rows], self.tail[rows], self.vocab_width)

    def to(self, device) -> SparseRows:
        return SparseRows(
            self.ids.to(device), self.log_probs.to(device), self.tail.to(device), self.vocab_width
        )

    def teacher_log_probs(self, temperature: float = 1.0) -> Tensor:
        """(N, K + 1) fp32: log p over the K ids then the tail, divided by T and renormalised."""
        raw = torch.cat([self.log_probs.float(), self.tail.float().unsqueeze(-1)], dim=-1)
        unused = torch.cat([self.ids < 0, torch.zeros_like(self.ids[:, :1], dtype=torch.bool)], dim=-1)
        raw = raw.masked_fill(unused, -math.inf)
        return F.log_softmax((raw / temperature).clamp(min=_LOGIT_FLOOR), dim=-1)

    def student_log_probs(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """(N, V_s) student logits -> (N, K + 1) fp32: log q of the K ids, then of every other token together.

        The student is cut to `vocab_width` columns first, as dense KD cuts to the shared width.
        """
        if student_logits.shape[0] != len(self) or student_logits.shape[-1] < self.vocab_width:
            raise ValueError(
                f"student rows {tuple(student_logits.shape)} do not match {len(self)} stored rows of "
                f"width {self.vocab_width}"
            )
        log_q = _log_probs(student_logits, self.vocab_width, temperature)  # (N, W)
        valid = self.ids >= 0
        index = self.ids.clamp(min=0)
        top = log_q.gather(-1, index).masked_fill(~valid, _LOGIT_FLOOR)  # (N, K)
        # An id may be listed once per row, but unused slots all point at column 0: count, do not assign.
        stored = torch.zeros_like(log_q).scatter_add_(-1, index, valid.float()) > 0  # (N, W)
        # masked_fill blocks the gradient to the stored columns; the floor keeps an empty tail finite.
        tail = torch.logsumexp(log_q.masked_fill(stored, _LOGIT_FLOOR), dim=-1, keepdim=True)
        return torch.cat([top, tail], dim=-1)

    def per_token_divergence(
        self,
        student_logits: Tensor,
        kind: str,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        skew_alpha: float = 0.1,
    ) -> Tensor:
        """(N, V_s) student logits -> (N,) divergence on the K + 1 categories (same kinds as dense)."""
        _check_params(kind, beta, temperature, skew_alpha)
        log_s = self.student_log_probs(student_logits, temperature)
        log_t = self.teacher_log_probs(temperature)
        return _divergence_of_log_probs(log_s, log_t, kind, beta, skew_alpha)

    def _tail_log_share(self, log_t: Tensor, width: int) -> Tensor:
        """(N,) log-probability of one tail token: the tail mass spread evenly over the unstored ids."""
        n_stored = ((self.ids >= 0) & (self.ids < width)).sum(-1)
        rest = (width - n_stored).clamp(min=1).float()
        share = log_t[:, -1] - rest.log()
        return torch.where(width - n_stored > 0, share, torch.full_like(share, -math.inf))

    def gold_log_prob(self, targets: Tensor, temperature: float = 1.0) -> Tensor:
        """(N,) log-probability of each label token: its stored value, else an even share of the tail."""
        log_t = self.teacher_log_probs(temperature)
        hit = (self.ids == targets.unsqueeze(-1)) & (self.ids >= 0)  # (N, K)
        stored = log_t[:, :-1].masked_fill(~hit, -math.inf).amax(-1)
        value = torch.where(hit.any(-1), stored, self._tail_log_share(log_t, self.vocab_width))
        return torch.where(targets < self.vocab_width, value, torch.full_like(value, -math.inf))

    def dense_log_probs(self, width: int, temperature: float = 1.0) -> Tensor:
        """(N, width) log-probabilities with the tail spread evenly over the unstored ids (for `mixture`).

        This is the one place a full row is built: (N, width) like the student's own rows, never per batch
        and sequence position of the whole vocabulary.
        """
        log_t = self.teacher_log_probs(temperature)
        dense = self._tail_log_share(log_t, width).clamp(min=_LOGIT_FLOOR).unsqueeze(-1).repeat(1, width)
        rows, slots = ((self.ids >= 0) & (self.ids < width)).nonzero(as_tuple=True)
        dense[rows, self.ids[rows, slots]] = log_t[rows, slots]
        return F.log_softmax(dense, dim=-1)  # ids past `width` left mass behind: renormalise
