"""CE + KD of one chunk of label positions together with its gradient w.r.t. the student logits, closed form.

Pure tensor code (imports torch only), used by the fused path (easydistill/loss/chunked.py). Values follow
losses.py exactly (same kinds, temperature, vocabulary cut, -inf floor); tests/test_fused.py checks them and
their gradients against autograd through losses.py. Everything works in place on (n, V) fp32 buffers that
one call reuses for every chunk: for a 152k vocabulary a fresh (64, V) tensor per operation would cost more
in page faults than the arithmetic.

For a divergence D that depends on the student only through p_s = softmax(z / T), with G = ∂D/∂p_s:
    ∂D/∂(z/T) = p_s ⊙ (G − ⟨p_s, G⟩)
so each kind only needs its G (noted next to it below). Cross-entropy at T = 1: ∂CE/∂z = p_s − onehot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# As in losses.py: -inf logits (banned tokens) become this finite floor, so no log-probability is -inf.
LOGIT_FLOOR = -1e30
_TINY = torch.finfo(torch.float32).tiny  # floor of a mixture's probability before its log


class ChunkBuffers:
    """(rows, width) fp32 buffers by name, allocated on first use and reused by every later chunk."""

    def __init__(self, rows: int, device):
        self.rows, self.device, self._buffers = rows, device, {}

    def take(self, name: str, n: int, width: int, rows: int | None = None) -> Tensor:
        """The first n rows (contiguous) of buffer `name` of this width; `rows` sizes it on first use."""
        buffer = self._buffers.get((name, width))
        if buffer is None:
            buffer = torch.empty(rows or self.rows, width, dtype=torch.float32, device=self.device)
            self._buffers[(name, width)] = buffer
        return buffer[:n]


def log_softmax_(x: Tensor, probs: Tensor) -> Tensor:
    """In place: x (n, V) becomes log_softmax(x); `probs` (n, V) receives softmax(x). Nothing (n, V) allocated."""
    top = x.amax(-1, keepdim=True)
    torch.sub(x, top, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return x.sub_(total.log_().add_(top))


def _log_mixture_into(out: Tensor, p: Tensor, q: Tensor, w: float) -> Tensor:
    """out = log(m / w), m = w·p + (1−w)·q, 0 < w < 1, floored at the smallest normal float before the log
    so that it stays finite where both distributions underflow (their terms are 0 there either way)."""
    return torch.add(p, q, alpha=(1.0 - w) / w, out=out).clamp_(min=_TINY).log_()


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """(n, V), (n, V) -> (n,) row-wise ⟨x, y⟩, without an (n, V) temporary on the CPU."""
    if x.device.type == "cpu":
        return torch.stack([torch.dot(a, b) for a, b in zip(x, y)])
    return (x * y).sum(-1)  # accelerators' caching allocators make the temporary cheap


def divergence_into(
    ls, ps, lt, pt, kind, beta, skew_alpha, a, need_grad
) -> tuple[Tensor, Tensor | None, float]:
    """(per-position divergence (n,), g (n, V) written into `a`, or None, scale) with ∂D/∂(z/T) = scale · g.

    ls/ps, lt/pt: student and teacher log-probabilities and probabilities (n, V); `a` scratch (n, V); lt and
    pt may be overwritten. Sums take p·(log p − log q) elementwise, never Σ p log p − Σ p log q: two entropies
    of a 100k-token vocabulary would cancel to a small divergence with fp32 rounding left over.
    """
    if kind == "jsd" and beta == 0.0 or kind == "skew_forward_kld" and skew_alpha == 0.0:
        kind = "forward_kld"
    if kind == "jsd" and beta == 1.0 or kind == "skew_reverse_kld" and skew_alpha == 0.0:
        kind = "reverse_kld"
    if kind == "forward_kld":  # KL(p_t‖p_s): ∂D/∂z = p_s − p_t directly
        per = _rowdot(pt, torch.sub(lt, ls, out=a))
        return per, (torch.sub(ps, pt, out=a) if need_grad else None), 1.0
    if kind == "reverse_kld":  # KL(p_s‖p_t): G = log p_s − log p_t + 1
        per = _rowdot(ps, torch.sub(ls, lt, out=a))
        return per, (a.sub_(per.unsqueeze(-1)).mul_(ps) if need_grad else None), 1.0
    if kind == "jsd":  # β KL(p_t‖m) + (1−β) KL(p_s‖m), m = β p_t + (1−β) p_s: G = (1−β)(log p_s − log m)
        log_w = math.log(beta)
        _log_mixture_into(a, pt, ps, beta)  # log m − log β
        kl_t = _rowdot(pt, lt.sub_(a)) - log_w
        c = _rowdot(ps, torch.sub(ls, a, out=a))  # KL(p_s‖m) + log β
        per = beta * kl_t + (1.0 - beta) * (c - log_w)
        return per, (a.sub_(c.unsqueeze(-1)).mul_(ps) if need_grad else None), 1.0 - beta
    if kind == "skew_forward_kld":  # KL(p_t‖m), m = α p_t + (1−α) p_s: G = −(1−α) p_t / m
        _log_mixture_into(a, pt, ps, skew_alpha)  # log m − log α
        per = _rowdot(pt, torch.sub(lt, a, out=a)) - math.log(skew_alpha)
        if not need_grad:
            return per, None, 1.0
        g, scale = a.exp_(), -(1.0 - skew_alpha) / skew_alpha  # a = α p_t / m
    elif kind == "skew_reverse_kld":  # KL(p_s‖m), m = α p_s + (1−α) p_t: G = log(p_s/m) + 1 − α p_s/m
        _log_mixture_into(a, ps, pt, skew_alpha)  # log m − log α
        per = _rowdot(ps, torch.sub(ls, a, out=a)) - math.log(skew_alpha)  # a = log(α p_s / m)
        if not need_grad:
            return per, None, 1.0
        g, scale = a.sub_(torch.exp(a, out=pt)), 1.0  # G up to constants, which drop out below
    elif kind == "tvd":  # ½ Σ|p_t − p_s|: G = ½ sign(p_s − p_t)
        torch.sub(ps, pt, out=a)
        per = 0.5 * torch.abs(a, out=pt).sum(-1)
        if not need_grad:
            return per, None, 1.0
        g, scale = a.sign_(), 0.5
    else:
        raise ValueError(f"unknown divergence kind {kind!r}")
    return per, g.sub_(_rowdot(ps, g).unsqueeze(-1)).mul_(ps), scale


def divergence_with_grad(
    log_s: Tensor,
    log_t: Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    need_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(n, V) student and teacher log-probabilities after the temperature -> (per-position divergence (n,), its
    gradient w.r.t. the student's temperature-scaled logits (n, V) or None), on fresh buffers."""
    ls, lt = log_s.clone(), log_t.clone()
    per, g, scale = divergence_into(
        ls, ls.exp(), lt, lt.exp(), kind, beta, skew_alpha, torch.empty_like(ls), need_grad
    )
    return per, (None if g is None else g.mul_(scale))


@dataclass
class ChunkSums:
    ce: Tensor  # fp32 scalars: CE and the combined KD summed over the chunk's positions
    kd: Tensor
    own: list[Tensor]  # each teacher's own divergence sum
    grad: Tensor | None  # (n, V_s) fp32 ∂(ce_weight·CE + kd_weight·KD)/∂z; may live in a buffer


def ce_kd_chunk(
    z: Tensor,
    targets: Tensor,
    rows: list[Tensor],
    owned: list[bool],
    weights,
    temperatures,
    *,
    kind: str,
    beta: float,
    skew_alpha: float,
    combine: str,
    ce_weight: float,
    kd_weight: float,
    need_grad: bool,
    buffers: ChunkBuffers,
) -> ChunkSums:
    """CE (T = 1, the student's full width) + `weighted_loss` / `sum` KD over dense teacher rows, one chunk.

    z (n, V_s) fp32 student logits, overwritten; rows[i] (n, V_t) teacher logits, overwritten when owned[i]
    (they are the caller's buffers), else copied. Teacher i runs at temperatures[i], on the first
    min(V_s, V_t) columns of both sides, as `combined_divergence` does. The returned gradient may live in
    one of `buffers`: use it before the next chunk.
    """
    n, width = z.shape
    p = buffers.take("p", n, width)
    log_p = log_softmax_(z, p)
    ce = -log_p.gather(-1, targets.unsqueeze(-1)).sum()
    # One teacher over the student's full width (the usual case) leaves its gradient in the scratch `a`, where
    # CE's is added at the end; otherwise the teachers' add up in `g`.
    single = len(rows) == 1 and rows[0].shape[-1] >= width
    grad = None
    if need_grad and rows and not single:
        grad = torch.mul(p, ce_weight, out=buffers.take("g", n, width))
    kd, own = ce.new_zeros(()), []
    for r, is_owned, w, t in zip(rows, owned, weights, temperatures):
        vocab = min(width, r.shape[-1])
        lt = r[:, :vocab]
        if not is_owned:  # a caller's tensor, maybe with -inf (banned tokens): copy, floor
            lt = buffers.take("teacher", n, vocab).copy_(lt).clamp_(min=LOGIT_FLOOR)
        if t != 1.0:
            lt.div_(t)
        pt = buffers.take("pt", n, vocab)
        log_softmax_(lt, pt)
        if t == 1.0 and vocab == width:  # CE's log-softmax is this teacher's student side too
            ls, ps = log_p, p
        else:  # log_softmax is shift-invariant: log_p / T gives log_softmax(z / T) on the first `vocab` columns
            ls = torch.div(log_p[:, :vocab], t, out=buffers.take("ls", n, vocab))
            ps = buffers.take("ps", n, vocab)
            log_softmax_(ls, ps)
        a = buffers.take("a", n, vocab)
        per, g, scale = divergence_into(ls, ps, lt, pt, kind, beta, skew_alpha, a, need_grad)
        coefficient = w if combine == "weighted_loss" else 1.0
        own.append(per.sum())
        kd = kd + coefficient * own[-1]
        if g is not None:
            alpha = kd_weight * coefficient * scale / t  # d(z/T)/dz = 1/T
            if single:
                grad = g.mul_(alpha).add_(p, alpha=ce_weight)
            else:
                grad[:, :vocab].add_(g, alpha=alpha)
    if need_grad:
        if grad is None:  # no teacher: CE alone, in place of the probabilities
            grad = p.mul_(ce_weight)
        grad[torch.arange(n, device=z.device), targets] -= ce_weight
    return ChunkSums(ce, kd, own, grad)
