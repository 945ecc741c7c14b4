"""A separate frozen model: eval mode, no grad, never in the optimizer, in its own dtype."""

from __future__ import annotations

import torch

from easydistill.config import TeacherSpec


class OnlineTeacher:
    def __init__(self, spec: TeacherSpec, model: torch.nn.Module):
        self.spec = spec
        self.model = model

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) input_ids -> (B, T, V_t) logits; position t predicts token t + 1."""
        self.model.eval()  # Trainer.train() calls .train() on what it knows; this model it does not know
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at the positions `mask` (B, T-1) selects: (N, V_t), row i predicting the
        same token as the student's row i."""
        return self.logits(batch)[:, :-1][mask]
