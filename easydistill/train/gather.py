"""Heads gathered once per step under a sharding engine, so that the KD step's chunk loop makes no collective.

Whatever is sharded, every rank must make the same collectives in the same order. The chunked loss visits a
head once per chunk and chunk counts differ between ranks (their label counts differ), so a head is gathered
once per micro-batch, around the whole loop, never by calling a sharded module per chunk. Which engine is in
force and where the models live is train/engines.py.
"""

from __future__ import annotations

import contextlib

import torch


def _sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in module.parameters())


def unchunkable_head(heads) -> str | None:
    """Why the fused loop cannot run on these heads, None when it can: a sharded head that is not a plain
    Linear (a LoRA'd or modules_to_save head) would be called as a module once per chunk, one collective per
    chunk, and chunk counts differ between ranks."""
    from easydistill.loss.head import plain_linear

    for head in heads:
        if head is not None and _sharded(head) and not plain_linear(head):
            return f"the output head is sharded and not a plain Linear ({type(head).__name__})"
    return None


def _fsdp_owner(module: torch.nn.Module, roots):
    """The innermost FSDP2 module (under one of `roots`) whose parameter group holds `module`'s parameters."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return module
    owner = None
    for root in roots:
        for candidate in root.modules():
            if isinstance(candidate, FSDPModule) and any(m is module for m in candidate.modules()):
                owner = candidate  # modules() is pre-order: later matches are deeper
    return owner


@contextlib.contextmanager
def gathered(heads, roots=()):
    """Inside, each module of `heads` holds its full parameters on every rank: one all-gather per head per
    step, so that the chunk loop that uses them makes no collective (chunk counts differ between ranks).

    ZeRO-3: deepspeed.zero.GatheredParameters (read-only: re-partitioned on exit, gradients reach the
    partitioned parameters through DeepSpeed's hooks). FSDP2: the owning FSDP module's unshard(); a frozen
    one is resharded on exit, a trained one by FSDP's end-of-backward callback, which reduce-scatters the
    gradients the chunk loop gave its unsharded parameters. Anything else: nothing to do.
    """
    heads = [h for i, h in enumerate(heads) if h is not None and all(h is not g for g in heads[:i])]
    params = [p for h in heads for p in h.parameters() if hasattr(p, "ds_id")]
    with contextlib.ExitStack() as stack:
        if params:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        owners = []
        for head in heads:
            if any(type(p).__name__ == "DTensor" for p in head.parameters()):
                owner = _fsdp_owner(head, roots)
                if owner is not None and all(owner is not o for o in owners):
                    owners.append(owner)
        for owner in owners:
            owner.unshard()
            if not any(p.requires_grad for p in owner.parameters()):
                stack.callback(owner.reshard)
        yield


def regather_for_backward(head: torch.nn.Module) -> None:
    """Called from the fused loss's backward, before it hands over the head's gradients: under ZeRO-3 the
    trained head parameters are gathered again (one all-gather per micro-batch, on every rank alike), so
    that their gradients meet full-size parameters and DeepSpeed's hooks reduce-scatter them; they are
    partitioned again when the backward pass ends."""
    params = [p for p in head.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not params:
        return
    import deepspeed

    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    context.__enter__()
    torch.autograd.Variable._execution_engine.queue_callback(lambda: context.__exit__(None, None, None))
