"""The student's own base weights with its LoRA adapters disabled: one copy of the weights in memory."""

from __future__ import annotations

import torch

from easydistill.config import TeacherSpec
from easydistill.models import final_hidden_states, project


class SelfTeacher:
    """Teacher forward = the student's PeftModel inside disable_adapter(), no grad, dropout off.

    The training flag of every submodule is put back exactly as it was, so the student's next forward is
    unchanged (dropout on where it was on).
    """

    def __init__(self, spec: TeacherSpec, peft_model: torch.nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("a self-teacher needs the student as a PEFT model (LoRA on)")
        self.spec = spec
        self.model = peft_model

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) input_ids -> (B, T, V) logits of the base model."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            for module, was_training in modes:
                module.training = was_training

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """(N, V) base-model logits at the positions `mask` (B, T-1) selects."""
        return self.logits(batch)[:, :-1][mask]

    @torch.no_grad()
    def hidden_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states of the base model at the positions `mask` (B, T-1) selects, without
        computing any logits; `head_logits` projects them, a chunk at a time."""
        from easydistill.models import eval_mode

        with eval_mode(self.model), self.model.disable_adapter():
            return final_hidden_states(self.model, batch)[:, :-1][mask]

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H) -> (n, V) through the output head the student shares, with its adapters (a LoRA or
        modules_to_save copy of the head, if any) disabled; into `out` when the head allows (see `project`)."""
        head = self.model.get_output_embeddings()
        if type(head) is torch.nn.Linear:  # a plain head has no adapter to switch off
            return project(head, hidden, out)
        with self.model.disable_adapter():
            return project(head, hidden)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        """Sample from the base model (adapters disabled), for sequence-level KD."""
        from easydistill.models import eval_mode

        with eval_mode(self.model), self.model.disable_adapter():
            return self.model.generate(**kwargs)
