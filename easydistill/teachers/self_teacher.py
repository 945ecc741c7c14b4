"""The student's own base weights with its LoRA adapters disabled: one copy of the weights in memory."""

from __future__ import annotations

import contextlib

import torch

from easydistill.config import TeacherSpec
from easydistill.loss.head import plain_linear
from easydistill.loss.rows import DenseRows
from easydistill.models import eval_mode, final_hidden_states, head_unsupported, project


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
        self.projects = head_unsupported(peft_model) is None

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @contextlib.contextmanager
    def _base(self):
        """The base model: adapters off, dropout off, no grad; everything put back on the way out."""
        with eval_mode(self.model), self.model.disable_adapter(), torch.no_grad():
            yield self.model

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> DenseRows:
        """(N, V) base-model logits at the positions `mask` (B, T-1) selects."""
        with self._base() as model:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return DenseRows(logits[:, :-1][mask])

    def hidden_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states of the base model at the positions `mask` (B, T-1) selects, without
        computing any logits; `head_logits` projects them, a chunk at a time."""
        with self._base() as model:
            return final_hidden_states(model, batch)[:, :-1][mask]

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H) -> (n, V) through the output head the student shares, with its adapters (a LoRA or
        modules_to_save copy of the head, if any) disabled; into `out` when the head allows (see `project`)."""
        if plain_linear(self.head):  # a plain head has no adapter to switch off
            return project(self.head, hidden, out)
        with self.model.disable_adapter():
            return project(self.head, hidden)

    def generate(self, **kwargs) -> torch.Tensor:
        """Sample from the base model (adapters disabled), for sequence-level KD."""
        with self._base() as model:
            return model.generate(**kwargs)
