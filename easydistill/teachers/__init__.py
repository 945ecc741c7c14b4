"""Teachers give token distributions for a batch of student inputs. A single teacher is a list of one.

Every teacher follows `Teacher`: its distribution at the positions `mask` (B, T-1) selects (label positions,
after the causal shift) as rows (loss/rows.py), row i describing the same prediction of the same sample as
the student's row i. Online and self teachers are models (`projects` True: the fused loss asks them for hidden
rows and projects a chunk at a time); stored teachers hand over sparse top-k rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

from easydistill.teachers.online import OnlineTeacher
from easydistill.teachers.self_teacher import SelfTeacher

__all__ = ["OnlineTeacher", "SelfTeacher", "Teacher", "build_teachers"]


class Teacher(Protocol):
    spec: object  # config.TeacherSpec: name, kind, weight, temperature
    projects: bool  # hidden_rows + head_logits give the same logits as rows (a model with a plain head)
    head: object  # its output layer (torch.nn.Module), None without a model

    def rows(self, batch: dict, mask):
        """DenseRows or SparseRows at the N positions `mask` (B, T-1) selects, under no_grad."""

    def hidden_rows(self, batch: dict, mask):
        """(N, H_t) final hidden states at those positions, no logits computed."""

    def head_logits(self, hidden, out=None):
        """(n, H_t) -> (n, V_t) logits, into `out` when the head allows it."""

    def generate(self, **kwargs):
        """Sampled token ids, as `model.generate` (sequence-level KD, evaluation)."""


def build_teachers(cfg, student_model, device, *, tokenizer=None, examples=None) -> list[Teacher]:
    """The config's teachers, for training and for evaluation alike. The self-teacher is `student_model` with its
    adapters off; a student without adapters (an evaluated merged or full model) gets models.student as a
    frozen online teacher instead (training configs cannot get there: a self-teacher needs LoRA).

    tokenizer (the student's) and examples (split -> TokenizedExamples) let a model teacher with another
    tokenizer join, behind a CrossTokenizerTeacher (teachers/cross_tokenizer.py)."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    from easydistill.models import load_frozen_teacher, outside_zero3_init

    # Only ZeRO-3 places a model while it loads (zero.Init); FSDP2 shards teachers once the Trainer exists.
    placement = "offload" if cfg.models.teacher_offload else (cfg.models.teacher_placement or "auto")
    if placement == "auto":
        placement = "sharded" if is_deepspeed_zero3_enabled() else "replicated"
    offload = placement == "offload"
    teachers = []
    for spec in cfg.teachers:
        if spec.kind == "self" and hasattr(student_model, "disable_adapter"):
            teachers.append(SelfTeacher(spec, student_model))
        elif spec.kind in ("self", "online"):
            if spec.kind == "self":
                spec = dataclasses.replace(spec, kind="online", path=cfg.models.student)
            # ZeRO-3 partitions a teacher while it loads only when it is to be sharded (train/engines.py)
            with contextlib.nullcontext() if placement == "sharded" else outside_zero3_init():
                model = load_frozen_teacher(
                    spec.path, cfg, torch.device("cpu") if offload else torch.device(device)
                )
            teacher = OnlineTeacher(spec, model, offload=offload)
            if tokenizer is not None:
                from easydistill.teachers.cross_tokenizer import maybe_cross_tokenizer

                teacher = maybe_cross_tokenizer(teacher, cfg, tokenizer, examples)
            teachers.append(teacher)
        else:  # stored logits: kd.infer (or kd.train, before this) made sure the store is complete
            from easydistill.teachers.cached import CachedTeacher

            teachers.append(CachedTeacher.open(spec, cfg))
    return teachers
