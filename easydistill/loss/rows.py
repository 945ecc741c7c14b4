"""A teacher's rows at the N label positions: dense logits or stored top-k, behind the same methods.

Pure tensor code (torch only). Every teacher hands over one of these (teachers/), and everything that scores a
student against a teacher (loss/combine.py, loss/chunked.py, evaluation/metrics.py) calls the methods below,
never asking which kind of rows it holds:

    rows.width                                   columns of the teacher's distribution (its vocabulary cut)
    len(rows), rows[positions], rows.to(device)  N positions; a subset of them; moved
    rows.log_probs_pair(student_logits, T)       (log_s, log_t) (N, C) on the categories both sides share
    rows.per_token_divergence(student, kind, ...) (N,) through the divergence table (loss/divergence.py)
    rows.dense_log_probs(width, T)               (N, width) teacher log-probabilities (for `mixture`)
    rows.gold_log_prob(targets, T)               (N,) log p_T of each label token (for `confidence`)
    rows.top1(width)                             (N,) the teacher's most likely token id (among `width`)
    rows.mass_figures(student_logits)            {} for dense rows; stored rows add the top-k mass sums
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from easydistill.loss.divergence import LOGIT_FLOOR, check_params, log_probs, of_log_probs, shared_log_probs


class _Rows:
    """What both kinds of rows compute the same way, from their own `log_probs_pair`."""

    def per_token_divergence(
        self,
        student_logits: Tensor,
        kind: str,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        skew_alpha: float = 0.1,
    ) -> Tensor:
        """(N, V_s) student logits -> (N,) divergence on the shared categories (same kinds as dense logits)."""
        check_params(kind, beta, temperature, skew_alpha)
        log_s, log_t = self.log_probs_pair(student_logits, temperature)
        return of_log_probs(log_s, log_t, kind, beta, skew_alpha)


class DenseRows(_Rows):
    """(N, V_t) teacher logits; padding columns past the student's width are cut before any softmax."""

    def __init__(self, logits: Tensor):
        self.logits = logits

    @property
    def width(self) -> int:
        return self.logits.shape[-1]

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, positions) -> DenseRows:
        return DenseRows(self.logits[positions])

    def to(self, device) -> DenseRows:
        return DenseRows(self.logits.to(device))

    def log_probs_pair(self, student_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return shared_log_probs(student_logits, self.logits, temperature)

    def dense_log_probs(self, width: int, temperature: float = 1.0) -> Tensor:
        return log_probs(self.logits, width, temperature)

    def gold_log_prob(self, targets: Tensor, temperature: float = 1.0) -> Tensor:
        """(N,) log-probability of each label token over the teacher's full width (-inf past it)."""
        log_p = torch.log_softmax(self.logits.float() / temperature, dim=-1)
        inside = targets < self.width
        gathered = log_p.gather(-1, targets.clamp(max=self.width - 1).unsqueeze(-1)).squeeze(-1)
        return torch.where(inside, gathered, torch.full_like(gathered, -math.inf))

    def top1(self, width: int | None = None) -> Tensor:
        return self.logits[:, :width].float().argmax(-1)

    def mass_figures(self, student_logits: Tensor) -> dict[str, Tensor]:
        return {}


class SparseRows(_Rows):
    """Stored teacher rows: for each of N positions the k most likely token ids plus one tail bucket.

    ids        (N, K) int64 token ids; -1 marks an unused slot (a row that stored fewer than K ids)
    log_probs  (N, K) the teacher's raw log-probabilities of those ids: log_softmax of its logits at
               temperature 1 over the first `vocab_width` columns (any float dtype; fp16 on disk)
    tail       (N,) log of the mass outside the stored ids, log(1 − Σ p_k); -inf when nothing is left

    Divergences are taken between two distributions over the same K + 1 categories (the K ids and the tail):
    the teacher's stored one, and the student's collapsed onto the same ids plus its own remaining mass. At
    temperature T the teacher's K + 1 log-masses are divided by T and renormalised; the tail is treated as one
    token, which is exact at T = 1 or when the tail is empty (k = V), approximate otherwise (docs/losses.md,
    "Sparse (top-k) teachers"). Nothing here builds a (batch, seq, vocab) tensor.
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

    @property
    def width(self) -> int:
        return self.vocab_width

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, positions) -> SparseRows:
        """A subset of the positions (a slice, index tensor or bool mask over N), e.g. for chunked losses."""
        return SparseRows(
            self.ids[positions], self.log_probs[positions], self.tail[positions], self.vocab_width
        )

    def to(self, device) -> SparseRows:
        return SparseRows(
            self.ids.to(device), self.log_probs.to(device), self.tail.to(device), self.vocab_width
        )

    def teacher_log_probs(self, temperature: float = 1.0) -> Tensor:
        """(N, K + 1) fp32: log p over the K ids then the tail, divided by T and renormalised."""
        raw = torch.cat([self.log_probs.float(), self.tail.float().unsqueeze(-1)], dim=-1)
        unused = torch.cat([self.ids < 0, torch.zeros_like(self.ids[:, :1], dtype=torch.bool)], dim=-1)
        raw = raw.masked_fill(unused, -math.inf)
        return F.log_softmax((raw / temperature).clamp(min=LOGIT_FLOOR), dim=-1)

    def student_log_probs(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """(N, V_s) student logits -> (N, K + 1) fp32: log q of the K ids, then of every other token together.

        The student is cut to `vocab_width` columns first, as dense KD cuts to the shared width.
        """
        if student_logits.shape[0] != len(self) or student_logits.shape[-1] < self.vocab_width:
            raise ValueError(
                f"student rows {tuple(student_logits.shape)} do not match {len(self)} stored rows of "
                f"width {self.vocab_width}"
            )
        log_q = log_probs(student_logits, self.vocab_width, temperature)  # (N, W)
        valid = self.ids >= 0
        index = self.ids.clamp(min=0)
        top = log_q.gather(-1, index).masked_fill(~valid, LOGIT_FLOOR)  # (N, K)
        # An id may be listed once per row, but unused slots all point at column 0: count, do not assign.
        stored = torch.zeros_like(log_q).scatter_add_(-1, index, valid.float()) > 0  # (N, W)
        # masked_fill blocks the gradient to the stored columns; the floor keeps an empty tail finite.
        tail = torch.logsumexp(log_q.masked_fill(stored, LOGIT_FLOOR), dim=-1, keepdim=True)
        return torch.cat([top, tail], dim=-1)

    def log_probs_pair(self, student_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return self.student_log_probs(student_logits, temperature), self.teacher_log_probs(temperature)

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

        The one place a full row is built: (N, width) like the student's own rows, never per batch and
        sequence position of the whole vocabulary.
        """
        log_t = self.teacher_log_probs(temperature)
        dense = self._tail_log_share(log_t, width).clamp(min=LOGIT_FLOOR).unsqueeze(-1).repeat(1, width)
        rows, slots = ((self.ids >= 0) & (self.ids < width)).nonzero(as_tuple=True)
        dense[rows, self.ids[rows, slots]] = log_t[rows, slots]
        return F.log_softmax(dense, dim=-1)  # ids past `width` left mass behind: renormalise

    def top1(self, width: int | None = None) -> Tensor:
        """(N,) the best stored id (stored ids lie inside any width a student shares with the store)."""
        scores = self.log_probs.float().masked_fill(self.ids < 0, -math.inf)
        return self.ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)

    def mass_figures(self, student_logits: Tensor) -> dict[str, Tensor]:
        """Sums over N: the teacher's mass on its stored ids (1 − tail), and the student's on the same ids."""
        stored = self.log_probs.float().masked_fill(self.ids < 0, -math.inf)
        return {
            "topk_mass": stored.logsumexp(-1).exp().sum(),
            "student_topk_mass": self.student_log_probs(student_logits)[:, :-1].logsumexp(-1).exp().sum(),
        }
