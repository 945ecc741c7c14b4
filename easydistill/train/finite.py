"""Finite-or-stop training: a step whose loss or gradient norm is not finite never updates the weights.

Each rank counts its non-finite micro-batch losses without synchronising. At the optimizer step, once the
gradient norm is known and before the optimizer runs, every rank sums (loss flags, norm flag) over all ranks:
one two-number all-reduce per optimizer step, made by every rank at the same point, so all ranks decide
alike. A bad step then either stops the run (RunStopped, exit 3: nothing is saved as final, the checkpoints
already written stay as they are) or, while `training.skip_nonfinite_steps` allows, is skipped: no optimizer
step and no scheduler step, as mixed precision does on an overflow; its gradients are dropped.

Under DeepSpeed the engine updates the weights inside backward(), before any norm is known: the check still
stops the run before anything is saved, but cannot undo that update, so a skipped step is skipped only by
DeepSpeed's own overflow handling.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from easydistill.errors import RunStopped
from easydistill.faults import nan_steps
from easydistill.runtime import print0


def _no_update(*args, **kwargs):
    return None


class _RestoreUpdates(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = self.trainer.optimizer
        if optimizer is not None and "step" in vars(optimizer):  # the step after a skipped one updates again
            del optimizer.step
            optimizer._is_overflow = False


class FiniteSteps:
    """Trainer mixin: check every optimizer step's losses and gradient norm before the optimizer runs."""

    def __init__(self, *args, skip_nonfinite_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped_steps: list[int] = []
        self._nonfinite_losses = torch.zeros((), dtype=torch.float32, device=self.args.device)
        self._nan_at, self._nan_rank = nan_steps()  # test-only: easydistill/faults.py
        self._nan_now = False
        self._nan_hook = None
        self.add_callback(_RestoreUpdates(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._nan_at:
            self._inject_nan(model)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_losses += (~torch.isfinite(loss.detach())).sum().to(self._nonfinite_losses)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_step(grad_norm)
        return grad_norm

    def _check_step(self, grad_norm) -> None:
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's norm is a DTensor (every rank makes this collective)
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32)
        flags = torch.stack(
            [self._nonfinite_losses, (~torch.isfinite(norm)).float().to(self._nonfinite_losses)]
        )
        bad_losses, bad_norm = self.accelerator.reduce(flags, reduction="sum").tolist()
        self._nonfinite_losses.zero_()
        if not (bad_losses or bad_norm):
            return
        step = self.state.global_step + 1
        what = (
            f"the loss is not finite on {int(bad_losses)} micro-batch(es)"
            if bad_losses
            else f"the gradient norm is not finite ({float(norm)})"
        )
        self.skipped_steps.append(step)
        limit = self.skip_nonfinite_steps
        if len(self.skipped_steps) > limit:
            raise RunStopped(self._stop_message(step, what, limit))
        print0(
            f"warning: step {step}: {what}; update skipped ({len(self.skipped_steps)} of at most {limit}, "
            "training.skip_nonfinite_steps)"
        )
        optimizer = self.optimizer
        optimizer.step = _no_update  # this step only; _RestoreUpdates removes it at the step's end
        optimizer._is_overflow = True  # accelerate's flag: Trainer then leaves the scheduler alone too

    def _stop_message(self, step: int, what: str, limit: int) -> str:
        from easydistill.train.checkpoints import last_complete_checkpoint

        last = last_complete_checkpoint(self.args.output_dir)
        skipped = f" after skipping {limit} such step(s) (training.skip_nonfinite_steps)" if limit else ""
        return (
            f"step {step}: {what}; training stopped{skipped} before this step changed the weights. Nothing was "
            f"saved as the final model; the last complete checkpoint is {last or 'none (none was written yet)'}. "
            "Lower the learning rate or check the data and the teachers; training.skip_nonfinite_steps lets a "
            "run skip a few such steps instead."
        )

    def _inject_nan(self, model) -> None:
        """Test-only (EASYDISTILL_TEST_NAN): the embeddings output NaN during the chosen steps."""
        if self._nan_hook is None:
            embeddings = self.accelerator.unwrap_model(model).get_input_embeddings()
            self._nan_hook = embeddings.register_forward_hook(
                lambda module, args, out: out * math.nan if self._nan_now else out
            )
        rank_ok = self._nan_rank is None or self._nan_rank == self.args.process_index
        self._nan_now = rank_ok and (self.state.global_step + 1) in self._nan_at
