"""`distillation.chunk_size` "auto": how many label positions the fused KD loss takes at a time.

Pure arithmetic on three facts known before the first step (vocabulary, hidden size, device), so the trainer,
the memory plan and the docs agree on one number. docs/performance.md shows the measurements behind it.
"""

from __future__ import annotations

AUTO = "auto"
MIB = 1024 * 1024
# Bytes the fused loop's fp32 (chunk x vocabulary) buffers may hold: about five for the student's side
# (logits, probabilities, gradient, scratch) plus one per model teacher.
BUFFER_BUDGET = {"cpu": 256 * MIB}
ACCELERATOR_BUDGET = 1024 * MIB
# Fewest positions per chunk: below these the head matmuls are starved (CPU: ~1.3x slower at 16 than at
# 32-64 in the benchmark; GPUs want hundreds of rows to fill their matrix units).
MIN_EFFICIENT = {"cpu": 32}
ACCELERATOR_MIN_EFFICIENT = 256
SMALLEST, LARGEST = 16, 4096


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def auto_chunk_size(
    vocab: int, hidden: int, device: str = "cpu", model_teachers: int = 1, device_memory: int | None = None
) -> int:
    """Positions per chunk for a student head of `vocab` rows and `hidden` columns on `device` ("cpu",
    "cuda", "mps", ...), with `model_teachers` teachers whose logits are projected per chunk.

    Each chunk reads the whole (vocab x hidden) head weight twice (projection, input gradient) and writes
    (chunk x vocab) fp32 logits; with at least hidden / 2 positions the weight traffic is no more than the
    logits', so that is the size aimed for, raised to the device's efficient minimum. The buffers must fit a
    budget (256 MiB on a CPU; 1 GiB on an accelerator, or 1/16 of its memory when smaller): the smaller of
    the two wins, as a power of two in [16, 4096].
    """
    kind = device.split(":")[0]
    budget = BUFFER_BUDGET.get(kind, ACCELERATOR_BUDGET)
    if device_memory and kind not in BUFFER_BUDGET:
        budget = min(budget, device_memory // 16)
    per_position = 4 * vocab * (5 + max(model_teachers, 0))
    wanted = max(hidden // 2, MIN_EFFICIENT.get(kind, ACCELERATOR_MIN_EFFICIENT))
    wanted = 1 << (wanted - 1).bit_length()  # up to a power of two
    fits = _power_of_two_at_most(budget // per_position)
    return max(SMALLEST, min(wanted, fits, LARGEST))
