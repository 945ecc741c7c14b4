"""Teachers give token distributions for a batch of student inputs. A single teacher is a list of one.

Every teacher has `spec` (name, weight, temperature) and `logits(inputs) -> (B, T, V_t)` computed under
no_grad for the batch's input_ids/attention_mask; stored-logit teachers slot in behind the same interface.
"""

from __future__ import annotations

from easydistill.teachers.online import OnlineTeacher
from easydistill.teachers.self_teacher import SelfTeacher

__all__ = ["OnlineTeacher", "SelfTeacher", "build_teachers"]


def build_teachers(cfg, student_model, device):
    from easydistill.errors import UserError
    from easydistill.models import load_frozen_teacher

    teachers = []
    for spec in cfg.teachers:
        if spec.kind == "self":
            teachers.append(SelfTeacher(spec, student_model))
        elif spec.kind == "online":
            teachers.append(OnlineTeacher(spec, load_frozen_teacher(spec.path, cfg, device)))
        else:
            raise UserError(
                f"teacher {spec.name!r}: training from stored teacher logits ({spec.logits_path}) is not in this "
                "release yet; remove dataset.logits_path (or the teacher's logits_path) to run the teacher online"
            )
    return teachers
