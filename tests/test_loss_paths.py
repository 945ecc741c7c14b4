"""The plain and the fused loss paths against one float64 reference written from the definitions.

Every kind × temperature × dense / stored (top-k) teacher rows, and the multi-teacher combines: the value and
the gradient w.r.t. the student's logits. The plain path is `combined_divergence` on the student's logits
(autograd through the divergence table's closed form); the fused path is `fused_head_loss` through an identity
head, so the gradient it hands the hidden rows is the gradient w.r.t. the logits. Nothing here is shared with
easydistill/loss/ but the rows' data: the reference is float64 autograd on explicit formulas.
"""

from __future__ import annotations

import pytest
import torch
from kd_helpers import loss_spec

from easydistill.loss.chunked import RowSource, fused_head_loss
from easydistill.loss.combine import combined_divergence
from easydistill.loss.divergence import KINDS
from easydistill.loss.rows import DenseRows, SparseRows

N, V, K = 9, 13, 5
BETA, ALPHA = 0.3, 0.2


# ---------------------------------------------------------------- the float64 reference


def kl(p, q):
    """Σ p (log p − log q), with 0 · log 0 = 0."""
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum(-1)


def reference(p_s, p_t, kind):
    """(N, C) student and teacher probabilities -> (N,) divergence, from the definitions (docs/losses.md)."""
    if kind == "forward_kld":
        return kl(p_t, p_s)
    if kind == "reverse_kld":
        return kl(p_s, p_t)
    if kind == "jsd":
        m = BETA * p_t + (1 - BETA) * p_s
        return BETA * kl(p_t, m) + (1 - BETA) * kl(p_s, m)
    if kind == "skew_forward_kld":
        return kl(p_t, ALPHA * p_t + (1 - ALPHA) * p_s)
    if kind == "skew_reverse_kld":
        return kl(p_s, ALPHA * p_s + (1 - ALPHA) * p_t)
    return 0.5 * (p_t - p_s).abs().sum(-1)


def dense_probs(z, teacher, temperature):
    """Both sides on the shared columns at temperature T."""
    width = min(z.shape[-1], teacher.shape[-1])
    return (z[:, :width] / temperature).softmax(-1), (teacher[:, :width].double() / temperature).softmax(-1)


def sparse_probs(z, rows: SparseRows, temperature):
    """The student collapsed onto the stored ids + everything else; the teacher's K + 1 masses at T."""
    q = (z[:, : rows.vocab_width] / temperature).softmax(-1)
    top = q.gather(-1, rows.ids)
    student = torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)
    raw = torch.cat([rows.log_probs.double(), rows.tail.double()[:, None]], -1)
    return student, (raw / temperature).softmax(-1)


def reference_value_and_grad(z, teachers, weights, temperatures, loss):
    """(KD sum, ∂KD/∂z) in float64 for the combine of `loss`; teachers are (kind, data) pairs."""
    z = z.double().detach().requires_grad_()
    pairs = [
        dense_probs(z, data, t) if kind == "dense" else sparse_probs(z, data, t)
        for (kind, data), t in zip(teachers, temperatures)
    ]
    per = [reference(p_s, p_t, loss.kind) for p_s, p_t in pairs]
    if loss.combine == "weighted_loss":
        total = sum(w * d.sum() for w, d in zip(weights, per))
    elif loss.combine == "sum":
        total = sum(d.sum() for d in per)
    elif loss.combine == "mixture":
        mixed = sum(w * p_t for w, (_, p_t) in zip(weights, pairs))
        total = reference((z / loss.temperature).softmax(-1), mixed, loss.kind).sum()
    else:  # confidence: c_i ∝ w_i · p_i(gold), p_i over the teacher's own full width
        full = [(data.double() / t).softmax(-1) for (_, data), t in zip(teachers, temperatures)]
        gold = torch.stack([p.gather(-1, TARGETS[:, None])[:, 0] for p in full])
        c = torch.tensor(weights, dtype=torch.float64)[:, None] * gold
        total = ((c / c.sum(0)) * torch.stack(per)).sum()
    (grad,) = torch.autograd.grad(total, z)
    return total.detach(), grad


# ---------------------------------------------------------------- the two paths


def plain(z, rows, weights, temperatures, loss):
    leaf = z.clone().requires_grad_()
    kd, _ = combined_divergence(leaf, rows, weights, temperatures, TARGETS, loss)
    (grad,) = torch.autograd.grad(kd, leaf)
    return kd.detach(), grad


def fused(z, rows, weights, temperatures, loss):
    """kd_ratio 1: the objective is the KD sum alone; an identity head makes hidden rows = logits."""
    head = torch.nn.Linear(V, V, bias=False).requires_grad_(False)
    head.weight.copy_(torch.eye(V))
    hidden = z.clone().requires_grad_()
    sources = [RowSource(lambda positions, out, r=r: r[positions]) for r in rows]
    sums = fused_head_loss(hidden, head, TARGETS, sources, weights, temperatures, loss)
    (grad,) = torch.autograd.grad(sums.objective, hidden)
    return sums.kd_sum, grad


def assert_matches(got, want):
    (value, grad), (ref_value, ref_grad) = got, want
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)  # fp32 against fp64


g = torch.Generator().manual_seed(3)
STUDENT = 3 * torch.randn(N, V, generator=g)
TEACHER = 3 * torch.randn(N, V + 4, generator=g)  # padded: four columns past the student's
TEACHER_2 = 3 * torch.randn(N, V, generator=g)
TARGETS = torch.randint(0, V, (N,), generator=g)


def stored(logits: torch.Tensor) -> SparseRows:
    log_p = torch.log_softmax(logits[:, :V].double(), -1)
    top, ids = log_p.topk(K, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, -torch.inf), dim=-1)
    return SparseRows(ids, top.float(), tail.float(), V)


@pytest.mark.parametrize("rows_kind", ["dense", "sparse"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_and_fused_paths_match_the_float64_reference(kind, temperature, rows_kind):
    loss = loss_spec(
        kd_ratio=1.0, kind=kind, beta=BETA, skew_alpha=ALPHA, temperature=temperature, chunk_size=4
    )
    data = TEACHER if rows_kind == "dense" else stored(TEACHER)
    rows = [DenseRows(data) if rows_kind == "dense" else data]
    want = reference_value_and_grad(STUDENT, [(rows_kind, data)], [1.0], [temperature], loss)
    assert float(want[0]) > 1e-3  # a divergence that is not trivially 0
    assert_matches(plain(STUDENT, rows, [1.0], [temperature], loss), want)
    assert_matches(fused(STUDENT, rows, [1.0], [temperature], loss), want)


@pytest.mark.parametrize("combine", ["weighted_loss", "sum", "mixture", "confidence"])
@pytest.mark.parametrize("kind", ["forward_kld", "jsd", "skew_reverse_kld", "tvd"])
def test_multi_teacher_combines_match_the_float64_reference(kind, combine):
    loss = loss_spec(
        kd_ratio=1.0, kind=kind, beta=BETA, skew_alpha=ALPHA, combine=combine, temperature=1.5, chunk_size=4
    )
    weights, temperatures = [0.7, 0.3], [1.5, 2.0]
    want = reference_value_and_grad(
        STUDENT, [("dense", TEACHER), ("dense", TEACHER_2)], weights, temperatures, loss
    )
    rows = [DenseRows(TEACHER), DenseRows(TEACHER_2)]
    assert_matches(plain(STUDENT, rows, weights, temperatures, loss), want)
    assert_matches(fused(STUDENT, rows, weights, temperatures, loss), want)


def test_the_reference_can_tell_the_kinds_apart():
    """Guard against a reference (or a table) that agrees with anything: each kind gives another value."""
    p_s, p_t = dense_probs(STUDENT.double(), TEACHER, 1.0)
    values = [float(reference(p_s, p_t, kind).sum()) for kind in KINDS]
    assert len({round(v, 6) for v in values}) == len(KINDS)
