"""On-policy GKD (Agarwal et al.): some batches are completions sampled by the student (or, with seq_kd, by
the teacher) for the batch's prompts; the divergence is then taken on the generated tokens only.

With probability lmbda(step) a micro-batch is on-policy. The draw depends only on (seed, step, micro-batch
index), so every rank makes the same decision without talking to the others. Completions are sampled at
`inference.temperature` (unset: 1) with distillation.top_p and distillation.max_new_tokens, through the one
generation helper (train/generation.py); distillation.temperature scales the loss only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from easydistill.models import eval_mode
from easydistill.train import generation


@dataclass(frozen=True)
class LmbdaSchedule:
    """lmbda over training: constant, or from `start` to `end` along a linear or cosine ramp."""

    start: float
    end: float
    kind: str = "constant"  # constant | linear | cosine

    def value(self, step: int, max_steps: int) -> float:
        if self.kind == "constant" or max_steps <= 0:
            return self.start
        progress = min(max(step / max_steps, 0.0), 1.0)
        ramp = progress if self.kind == "linear" else (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start + (self.end - self.start) * ramp


def schedule_from_config(distillation) -> LmbdaSchedule:
    sched = distillation.lmbda_schedule
    if not sched:
        return LmbdaSchedule(distillation.lmbda, distillation.lmbda)
    return LmbdaSchedule(sched["start"], sched["end"], sched.get("kind", "linear"))


def is_on_policy(lmbda: float, seed: int, step: int, micro: int) -> bool:
    """The same answer on every rank: a draw from a generator keyed by (seed, step, micro-batch)."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return random.Random(f"{seed}:{step}:{micro}").random() < lmbda


def split_prompts(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt: its tokens before the first label (the first response turn's start)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        labelled = (labels != -100).nonzero()
        start = int(labelled[0]) if len(labelled) else int(batch["attention_mask"][len(prompts)].sum())
        prompts.append(ids[:start])
    return prompts


def completion_batch(
    prompts: list[torch.Tensor],
    generated: torch.Tensor,
    eos_ids: set[int],
    pad_id: int,
    sample_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows; labels are the completion tokens, up to and with the first eos.

    generated: (B, G) the new tokens only (after the left-padded prompt), padded after eos.
    """
    rows, label_rows = [], []
    for prompt, new in zip(prompts, generated):
        keep = len(new)
        for j, tok in enumerate(new.tolist()):
            if tok in eos_ids:
                keep = j + 1
                break
        completion = new[:keep]
        rows.append(torch.cat([prompt, completion]))
        label_rows.append(torch.cat([torch.full_like(prompt, -100), completion]))
    width = max(len(r) for r in rows)
    device = generated.device
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(r)] = r
        labels[i, : len(r)] = lab
        attention[i, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if sample_index is not None:
        batch["sample_index"] = sample_index
    return batch


@torch.no_grad()
def sample_completions(
    generate, batch, *, sampling: generation.Sampling, pad_id: int, stop_ids: list[int], vocab_size: int
) -> dict[str, torch.Tensor]:
    """Sample completions for the batch's prompts with `generate` (a model's or a teacher's) and return the
    batch to train on: the same prompts, the sampled completions as labels (train/generation.py)."""
    prompts = split_prompts(batch)
    new = generation.continue_rows(
        generate, prompts, sampling, pad=pad_id, stops=stop_ids, vocab_size=vocab_size
    )
    return completion_batch(prompts, new, set(stop_ids), pad_id, batch.get("sample_index"))


def student_generate(model):
    """The student's generate, with dropout off for the duration (adapters stay on)."""

    def generate(**kwargs):
        with eval_mode(model):
            return model.generate(**kwargs)

    return generate


@dataclass(frozen=True)
class OnPolicySettings:
    schedule: LmbdaSchedule
    seq_kd: bool
    sampling: dict  # keyword arguments of sample_completions


def on_policy_settings(cfg, tokenizer, model) -> OnPolicySettings | None:
    """None when the config asks for neither student samples nor teacher samples."""
    d = cfg.distillation
    if not cfg.teachers or not (d.lmbda > 0 or d.lmbda_schedule or d.seq_kd):
        return None
    sampling = {
        "sampling": generation.on_policy_sampling(cfg),
        "pad_id": generation.pad_id(tokenizer),
        "stop_ids": generation.stop_ids(model, tokenizer),
        "vocab_size": len(tokenizer),
    }
    return OnPolicySettings(schedule_from_config(d), d.seq_kd, sampling)
