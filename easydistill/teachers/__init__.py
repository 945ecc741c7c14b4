"""Teachers give token distributions for a batch of student inputs. A single teacher is a list of one.

Every teacher has `spec` (name, weight, temperature) and `rows(batch, mask)`: its distribution at the
positions `mask` (B, T-1) selects (label positions, after the causal shift), as (N, V_t) logits computed
under no_grad. Row i describes the same prediction of the same sample as the student's row i. Stored-logit
teachers slot in behind the same method, returning sparse top-k rows instead of dense logits.
"""

from __future__ import annotations

from easydistill.teachers.online import OnlineTeacher
from easydistill.teachers.self_teacher import SelfTeacher

__all__ = ["OnlineTeacher", "SelfTeacher", "build_teachers"]


def build_teachers(cfg, student_model, device):
    import torch

    from easydistill.models import load_frozen_teacher

    teachers = []
    for spec in cfg.teachers:
        if spec.kind == "self":
            teachers.append(SelfTeacher(spec, student_model))
        elif spec.kind == "online":
            offload = cfg.models.teacher_offload
            model = load_frozen_teacher(spec.path, cfg, torch.device("cpu") if offload else device)
            teachers.append(OnlineTeacher(spec, model, offload=offload))
        else:  # stored logits: kd.infer (or kd.train, before this) made sure the store is complete
            from easydistill.teachers.cached import CachedTeacher

            teachers.append(CachedTeacher.open(spec, cfg))
    return teachers
