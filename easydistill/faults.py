"""Test-only fault injection: deterministic kills and non-finite losses at named points of a run.

Never set these outside tests. They exist so that the crash tests can kill a real `kd.train` process at an
exact point (a SIGKILL leaves no chance to clean up, like a power cut or the out-of-memory killer) and make
one step's loss non-finite on one rank.

    EASYDISTILL_TEST_KILL=checkpoint_save@4   # SIGKILL this process at the point "checkpoint_save", step 4
    EASYDISTILL_TEST_KILL=merge               # ... at "merge", whatever the step
    EASYDISTILL_TEST_NAN=3                    # optimizer step 3 (1-based) has a NaN loss on every rank
    EASYDISTILL_TEST_NAN=3,5:1                # steps 3 and 5, on rank 1 only

Kill points: step (gradients computed, weights not yet updated), checkpoint_save (the checkpoint's weights
written to its temporary folder, optimizer and state not yet), checkpoint_publish (a complete temporary
checkpoint, not yet renamed), final_save (the final model written to its temporary folder), final_publish
(the first final file moved into output_dir, the others not), merge (the merged model written to its
temporary folder, not yet checked).
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "EASYDISTILL_TEST_KILL"
NAN_ENV = "EASYDISTILL_TEST_NAN"


def kill_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process when EASYDISTILL_TEST_KILL names this point (and this step, if it gives one)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, at = wanted.partition("@")
    if point == name and (not at or (step is not None and int(at) == step)):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_steps() -> tuple[set[int], int | None]:
    """(1-based optimizer steps whose loss is made NaN, the rank it happens on or None for all)."""
    wanted = os.environ.get(NAN_ENV)
    if not wanted:
        return set(), None
    steps, _, rank = wanted.partition(":")
    return {int(s) for s in steps.split(",") if s.strip()}, int(rank) if rank else None
