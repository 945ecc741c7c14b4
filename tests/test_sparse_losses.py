"""Sparse (top-k + tail) teacher rows against the dense divergences they approximate (docs/losses.md)."""

from __future__ import annotations

import math

import pytest
import torch

from easydistill.loss import divergence as losses
from easydistill.loss.divergence import KINDS
from easydistill.loss.rows import SparseRows

N, V = 7, 23


def _rows(teacher: torch.Tensor, k: int) -> SparseRows:
    log_p = torch.log_softmax(teacher.double(), dim=-1)
    top, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1)
    return SparseRows(ids, top, tail, teacher.shape[-1])


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_full_k_equals_dense(logits, kind, temperature):
    student, teacher = logits
    dense = losses.per_token_divergence(student, teacher, kind, temperature=temperature, beta=0.3)
    sparse = _rows(teacher, V).per_token_divergence(student, kind, temperature=temperature, beta=0.3)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_is_the_coarse_grained_divergence(logits, kind):
    """At T = 1 the sparse value is D between the distributions collapsed onto S ∪ {tail}: never above dense."""
    student, teacher = logits
    rows = _rows(teacher, 5)
    sparse = rows.per_token_divergence(student, kind)
    # Reference: build the collapsed distributions by hand in float64 and use the dense code on them.
    p, q = teacher.double().softmax(-1), student.double().softmax(-1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, rows.ids, True)
    coarse = [
        torch.cat([x.gather(-1, rows.ids), (x * ~in_top).sum(-1, keepdim=True)], -1).log() for x in (q, p)
    ]
    reference = losses.per_token_divergence(coarse[0], coarse[1], kind)
    torch.testing.assert_close(sparse.double(), reference.double(), rtol=1e-4, atol=1e-5)
    assert (sparse <= losses.per_token_divergence(student, teacher, kind) + 1e-6).all()


def test_temperature_treats_the_tail_as_one_token(logits):
    student, teacher = logits
    rows = _rows(teacher, 4)
    z = torch.cat([rows.log_probs, rows.tail[:, None]], -1) / 2.0
    torch.testing.assert_close(rows.teacher_log_probs(2.0), torch.log_softmax(z.float(), -1))
    # A teacher whose tail is a single token is then exact at any temperature.
    single = _rows(teacher, V - 1)
    dense = losses.per_token_divergence(student, teacher, "forward_kld", temperature=2.0)
    torch.testing.assert_close(single.per_token_divergence(student, "forward_kld", temperature=2.0), dense)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_rows_and_empty_batches_give_zero_and_finite_gradients(logits, kind):
    student = logits[0].clone().requires_grad_()
    empty = SparseRows(torch.full((N, 3), -1), torch.zeros(N, 3), torch.zeros(N), V)  # all mass in the tail
    value = empty.per_token_divergence(student, kind)
    assert value.abs().max() < 1e-5
    value.sum().backward()
    assert student.grad.abs().max() < 1e-5
    nothing = SparseRows(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0), V)
    s0 = torch.zeros(0, V, requires_grad=True)
    out = nothing.per_token_divergence(s0, kind)
    out.sum().backward()
    assert out.shape == (0,) and s0.grad.shape == (0, V)


@pytest.mark.parametrize("kind", KINDS)
def test_unused_slots_and_empty_tails_keep_gradients_finite(logits, kind):
    student, teacher = logits
    full = _rows(teacher, V)  # tail = -inf
    ids, log_probs = full.ids.clone(), full.log_probs.clone()
    ids[:, -2:], log_probs[:, -2:] = -1, -math.inf  # two unused slots; their mass is simply missing
    s = student.clone().requires_grad_()
    for rows in (full, SparseRows(ids, log_probs, full.tail, V)):
        rows.per_token_divergence(s, kind, temperature=0.7).sum().backward()
        assert torch.isfinite(s.grad).all()


def test_gold_log_prob_and_dense_rows(logits):
    _, teacher = logits
    rows = _rows(teacher, 5)
    log_p = torch.log_softmax(teacher.double(), -1)
    stored = rows.ids[:, 0]
    other = torch.tensor([next(v for v in range(V) if v not in set(r)) for r in rows.ids.tolist()])
    torch.testing.assert_close(
        rows.gold_log_prob(stored), log_p.gather(-1, stored[:, None]).squeeze(-1).float()
    )
    even_share = rows.tail.float() - math.log(V - 5)
    torch.testing.assert_close(rows.gold_log_prob(other), even_share)
    assert rows.gold_log_prob(torch.full((N,), V)).eq(-math.inf).all()  # past the vocabulary
    dense = rows.dense_log_probs(V)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(N))
    torch.testing.assert_close(dense.gather(-1, rows.ids), rows.log_probs.float())
    torch.testing.assert_close(_rows(teacher, V).dense_log_probs(V), log_p.float())
    assert len(rows[2:5]) == 3 and rows[torch.tensor([0, 6])].ids.tolist() == rows.ids[[0, 6]].tolist()
