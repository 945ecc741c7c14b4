"""Projecting a teacher's next-token distribution onto the student's vocabulary (cross-tokenizer KD).

Pure tensor code: imports torch and the standard library only. The maths (docs/losses.md, "Cross-tokenizer"):

    q(v) = Σ_{u : map(u) = v} p'(u) + [v = gold] · moved        for v < W (the student's width)
    r    = Σ_{u : map(u) = -1} p'(u)                            the residual bucket
    moved = p(first) · exp(log_fraction),   p' = p − moved · onehot(first)

p is the teacher's softmax over its real vocabulary (padding rows excluded); `map` sends each teacher id to a
student id or to the residual (-1). `first`/`gold`/`log_fraction` route, per aligned position, the share of the
teacher's first token that in this context *is* the student's gold token: all of it for EXACT and PREFIX
spans (log_fraction 0), the chain-rule product of the teacher's next tokens for CHAIN spans. Σ q + r = 1.

The result is stored the way stored teachers are (`SparseRows`): the top k student ids, their log q, and the
tail log(r + the mass of the other student ids), so every loss path, the store and the combine modes take it
unchanged. k is at most W − 1, so the student always has mass in the tail to answer the residual with; with
k = W − 1 and nothing unmapped the tail is one token and the divergences are exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


def map_digest(teacher_to_student: Tensor, student_width: int) -> str:
    """A short hash of a vocabulary map (and the width it projects onto), for stores and checks."""
    ids = ",".join(map(str, teacher_to_student.tolist()))
    return hashlib.sha256(f"{student_width}:{ids}".encode()).hexdigest()[:16]


@dataclass
class ProjectedRows:
    """(n, k) student ids, (n, k) log q, (n,) log of the tail, (n,) mapped mass Σ q (the rest is residual)."""

    ids: Tensor
    log_probs: Tensor
    tail: Tensor
    mapped_mass: Tensor


def project_rows(
    teacher_logits: Tensor,
    teacher_to_student: Tensor,
    student_width: int,
    *,
    top_k: int,
    first: Tensor | None = None,
    gold: Tensor | None = None,
    log_fraction: Tensor | None = None,
) -> ProjectedRows:
    """(n, V_t) teacher logits at temperature 1 -> the top min(top_k, W − 1) of q over the student's W ids
    (W = student_width); ids the teacher gives no mass come back as -1.

    teacher_to_student (M,) int64, M <= V_t the teacher's real vocabulary (columns past M are padding rows and
    are left out of the softmax), entries in [-1, W). first (n,) teacher ids (-1: no routing), gold (n,) student
    ids, log_fraction (n,) <= 0: per row, p(first) · exp(log_fraction) goes to `gold` instead of map(first).
    """
    n, m = teacher_logits.shape[0], teacher_to_student.shape[0]
    if m > teacher_logits.shape[-1]:
        raise ValueError(
            f"the map covers {m} teacher ids but the rows have {teacher_logits.shape[-1]} columns"
        )
    if teacher_to_student.numel() and int(teacher_to_student.max()) >= student_width:
        raise ValueError(f"the map sends a teacher id past the student's width {student_width}")
    p = torch.softmax(teacher_logits[:, :m].float(), dim=-1)  # (n, M)
    moved = p.new_zeros(n)
    routed = None
    if first is not None:
        routed = first >= 0  # (n,)
        index = first.clamp(min=0).unsqueeze(-1)
        share = p.gather(-1, index).squeeze(-1) * log_fraction.float().clamp(max=0.0).exp()
        moved = torch.where(routed, share, moved)
        # Subtract what moves; a fraction of 1 leaves exactly 0 behind (x − x), never a negative rounding.
        p = p.scatter_add(-1, index, -moved.unsqueeze(-1)).clamp_(min=0.0)
    target = torch.where(teacher_to_student >= 0, teacher_to_student, student_width)  # residual = column W
    q = p.new_zeros(n, student_width + 1).scatter_add_(-1, target.expand(n, m), p)
    if routed is not None:
        q.scatter_add_(-1, torch.where(routed, gold, student_width).unsqueeze(-1), moved.unsqueeze(-1))
    return _top_k(q, student_width, top_k)


def _top_k(q: Tensor, student_width: int, top_k: int) -> ProjectedRows:
    """(n, W + 1) masses (last column: the residual) -> the kept ids, their log-masses and the tail."""
    # At least one student id stays in the tail: the teacher's residual needs a student counterpart there (the
    # student's mass outside the kept ids), or a row with residual mass would give an unbounded divergence.
    k = max(1, min(top_k, student_width - 1))
    mapped_mass = q[:, :student_width].sum(-1)
    top, ids = q[:, :student_width].topk(k, dim=-1)  # (n, k)
    # The tail is summed from what is left, not taken as 1 − Σ top: no cancellation when the tail is tiny.
    rest = q.scatter(-1, ids, 0.0).sum(-1)
    # An id the teacher gives nothing (fewer reachable ids than k) is not kept: the student's mass there joins
    # its tail, where the teacher's residual is.
    ids = ids.masked_fill(top <= 0, -1)
    return ProjectedRows(ids, top.log(), rest.log(), mapped_mass)


def project_pairs(
    teacher_logits: Tensor,
    row_of: Tensor,
    teacher_ids: Tensor,
    targets: Tensor,
    student_width: int,
    *,
    top_k: int,
    teacher_vocab: int,
) -> ProjectedRows:
    """Rows whose teacher distribution is *conditioned*: only the listed teacher ids count, renormalised.

    teacher_logits (n, V_t); pairs (row_of (m,), teacher_ids (m,), targets (m,) in [-1, W)): row r keeps the
    teacher ids listed for it, each sent to its target (-1: the residual). Per row

        q(v) = Σ_{listed w : target(w) = v} p(w) / Σ_{listed w} p(w)

    over the softmax p of the first `teacher_vocab` columns: the teacher's next-token distribution given that
    its next entry begins with text already written (docs/losses.md, "Cross-tokenizer teachers"). A row with
    nothing listed (or no mass on what is) is all residual.
    """
    n = teacher_logits.shape[0]
    p = torch.softmax(teacher_logits[:, :teacher_vocab].float(), dim=-1)  # (n, M)
    mass = p[row_of, teacher_ids]  # (m,)
    total = p.new_zeros(n).index_add_(0, row_of, mass)
    column = torch.where(targets >= 0, targets, student_width)
    q = p.new_zeros(n, student_width + 1).index_put_((row_of, column), mass, accumulate=True)
    empty = total <= 0
    q = q / total.clamp(min=torch.finfo(q.dtype).tiny).unsqueeze(-1)
    q[empty, student_width] = 1.0
    return _top_k(q, student_width, top_k)


def chain_log_fraction(token_log_probs: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """Σ of token_log_probs[starts + 1 .. starts + lengths − 1] per row: log Π p(t_{i+k} | context), k >= 1.

    token_log_probs (L,) the teacher's log-probability of each of its own tokens in its sequence; starts (n,)
    and lengths (n,) >= 1 the first token and the number of teacher tokens of each chain. Rows of length 1
    give 0 (the whole first token moves).
    """
    out = token_log_probs.new_zeros(starts.shape, dtype=torch.float32)
    longest = int(lengths.max()) if lengths.numel() else 0
    last = token_log_probs.shape[0] - 1
    for k in range(1, longest):  # chains are short (a few tokens): a loop over k, not over rows
        inside = lengths > k
        value = token_log_probs.float()[(starts + k).clamp(max=last)]
        out = out + torch.where(inside, value, torch.zeros_like(value))
    return out.clamp(max=0.0)
