"""Where a training step's time goes: seconds per part, summed between two logs (see docs/performance.md)."""

from __future__ import annotations

import contextlib
import time

import torch

# The parts a step is split into; what is left of the step's wall time (optimizer, data loading, Trainer's
# own bookkeeping) is logged as time/other.
PARTS = ("generation", "teacher_forward", "student_forward", "loss", "student_backward")


class StepClock:
    """Seconds spent in each of PARTS since the last `take()`. On a CUDA device each timed part is bracketed by
    synchronisations, so that queued kernels are charged to the part that launched them."""

    def __init__(self, device: torch.device | str | None = None):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        cuda = device is not None and torch.device(device).type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - start

    def take(self) -> list[float]:
        """The seconds of every part (in PARTS order), and start again from zero."""
        values = [self.seconds[p] for p in PARTS]
        self.seconds = dict.fromkeys(PARTS, 0.0)
        return values


def timed(clock: StepClock | None, name: str):
    """`clock.part(name)`, or nothing when there is no clock (evaluation, direct callers)."""
    return clock.part(name) if clock is not None else contextlib.nullcontext()
