"""The student's output layer inside the fused loop (loss/chunked.py): a chunk's logits into a reused buffer,
the chunk's gradient into the hidden rows' and the head parameters' accumulators, and the autograd node that
hands those gradients over in backward without recomputing anything. Pure tensor code (torch only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ChunkBuffers:
    """(rows, width) fp32 buffers by name, allocated on first use and reused by every later chunk: for a 152k
    vocabulary a fresh (64, V) tensor per operation would cost more in page faults than the arithmetic."""

    def __init__(self, rows: int, device):
        self.rows, self.device, self._buffers = rows, device, {}

    def take(self, name: str, n: int, width: int, rows: int | None = None) -> Tensor:
        """The first n rows (contiguous) of buffer `name` of this width; `rows` sizes it on first use."""
        buffer = self._buffers.get((name, width))
        if buffer is None:
            buffer = torch.empty(rows or self.rows, width, dtype=torch.float32, device=self.device)
            self._buffers[(name, width)] = buffer
        return buffer[:n]


def plain_linear(module: torch.nn.Module) -> bool:
    """Whether `module(x)` is just F.linear(x, weight, bias): a Linear whose forward is Linear's own (torch's
    Linear, or one FSDP2 wrapped: fully_shard swaps the class for an FSDPLinear subclass, forward unchanged)."""
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


class PrecomputedGrad(torch.autograd.Function):
    """Forward: the objective computed, with its gradients, beforehand. Backward: those gradients of `inputs`
    times grad_output; nothing is recomputed."""

    @staticmethod
    def forward(ctx, value, grads, on_backward, *inputs):
        ctx.grads, ctx.on_backward = grads, on_backward
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None  # scaled in place and handed over: no second copy of dW
        if ctx.on_backward is not None:  # e.g. a sharded head gathered again for its gradient
            ctx.on_backward()
        return (None, None, None, *(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads))


class StudentHead:
    """The student's output layer in the fused loop: chunk logits into a buffer, chunk gradients into the
    hidden rows' and the trainable head parameters' gradient accumulators.

    A plain Linear head is applied and differentiated by hand (dW accumulated with addmm_, no (V, H)
    temporary per chunk); any other head (a LoRA'd head, a modules_to_save copy) by its own forward and
    autograd on the chunk."""

    def __init__(self, head: torch.nn.Module, hidden: Tensor):
        self.head, self.linear = head, plain_linear(head)
        candidates = [head.weight, head.bias] if self.linear else list(head.parameters())
        self.params = [p for p in candidates if p is not None and p.requires_grad]
        self.dtype = head.weight.dtype if self.linear else next(head.parameters()).dtype
        self.need_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(self.params))
        self.grad_hidden = torch.zeros_like(hidden) if self.need_grad and hidden.requires_grad else None
        self.param_grads = (
            [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if self.need_grad else []
        )
        self._h, self._z = None, None

    def logits(self, h: Tensor, extra: list[Tensor], buffers: ChunkBuffers) -> tuple[Tensor, list[Tensor]]:
        """(n, H) hidden rows (+ teachers' rows sharing this head) -> (n, V) fp32 logits in a buffer, and the
        sharing teachers' (n, V) logits."""
        # Mixed precision may hand over fp32 hidden states (accelerate converts outputs) for a bf16 head.
        h = self._h = h.detach().to(self.dtype)
        n = h.shape[0]
        if not self.linear:
            with torch.set_grad_enabled(self.need_grad):
                self._h = h.requires_grad_(self.grad_hidden is not None)
                self._z = self.head(self._h)
            return buffers.take("z", n, self._z.shape[-1]).copy_(self._z.detach()), []
        weight, bias = self.head.weight, self.head.bias
        stacked = torch.cat([h] + [e.to(self.dtype) for e in extra]) if extra else h
        out = buffers.take("z", stacked.shape[0], weight.shape[0], rows=buffers.rows * (1 + len(extra)))
        with torch.no_grad():
            if weight.dtype == torch.float32:
                torch.mm(stacked, weight.t(), out=out)
                if bias is not None:
                    out.add_(bias)
            else:
                out.copy_(F.linear(stacked, weight, bias))
        return out[:n], [out[n * (j + 1) : n * (j + 2)] for j in range(len(extra))]

    def backprop(self, positions: slice, grad: Tensor) -> None:
        """Turn the chunk's ∂objective/∂logits (n, V) into the hidden rows' and the parameters' gradients."""
        if not self.linear:
            wrt = ([self._h] if self.grad_hidden is not None else []) + self.params
            grads = torch.autograd.grad(self._z, wrt, grad_outputs=grad.to(self._z.dtype), allow_unused=True)
            if self.grad_hidden is not None:
                self.grad_hidden[positions], grads = grads[0], grads[1:]
            for acc, g in zip(self.param_grads, grads):
                if g is not None:
                    acc += g
            return
        weight = self.head.weight
        with torch.no_grad():
            g = grad.to(weight.dtype)
            if self.grad_hidden is not None and self.grad_hidden.dtype == g.dtype:
                torch.mm(g, weight, out=self.grad_hidden[positions])  # (n, H)
            elif self.grad_hidden is not None:
                self.grad_hidden[positions] = g @ weight
            for p, acc in zip(self.params, self.param_grads):
                if p is weight:
                    acc.addmm_(grad.t(), self._h.float())  # (V, n) @ (n, H)
                else:
                    acc += grad.sum(0)

    def attach(self, objective: Tensor, hidden: Tensor, on_backward=None) -> Tensor:
        """The objective as a function of the hidden rows and the head, with the gradients gathered."""
        if not self.need_grad:
            return objective
        inputs = ([hidden] if self.grad_hidden is not None else []) + self.params
        grads = ([self.grad_hidden] if self.grad_hidden is not None else []) + [
            g.to(p.dtype) for g, p in zip(self.param_grads, self.params)
        ]
        return PrecomputedGrad.apply(objective, grads, on_backward if self.params else None, *inputs)
