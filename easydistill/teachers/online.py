"""A separate frozen model: eval mode, no grad, never in the optimizer, in its own dtype."""

from __future__ import annotations

import torch

from easydistill.config import TeacherSpec
from easydistill.models import final_hidden_states, project


class OnlineTeacher:
    """`offload`: the weights wait on the CPU and visit the batch's device only for their forward, so that
    several teachers share one device's memory one at a time."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, *, offload: bool = False):
        self.spec = spec
        self.model = model
        self.offload = offload
        if offload:
            self.model.to("cpu")

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) input_ids -> (B, T, V_t) logits; position t predicts token t + 1."""
        self.model.eval()  # Trainer.train() calls .train() on what it knows; this model it does not know
        device = batch["input_ids"].device
        if self.offload:
            self.model.to(device)
        try:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            if self.offload:
                self.model.to("cpu")

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at the positions `mask` (B, T-1) selects: (N, V_t), row i predicting the
        same token as the student's row i."""
        return self.logits(batch)[:, :-1][mask]

    @torch.no_grad()
    def hidden_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states at the positions `mask` (B, T-1) selects: (N, H_t), without
        computing any logits (`head_logits` turns a slice of them into logits, a chunk at a time)."""
        self.model.eval()
        device = batch["input_ids"].device
        if self.offload:
            self.model.to(device)
        try:
            return final_hidden_states(self.model, batch)[:, :-1][mask]
        finally:
            if self.offload:
                self.model.to("cpu")

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H_t) hidden states -> (n, V_t) logits through the teacher's output head, written into `out` when
        given and the head allows it (a plain Linear of out's dtype): check the result, not `out`."""
        head = self.model.get_output_embeddings()
        # offload: the head visits the device for this slice only, like the body in hidden_rows
        return project(head, hidden, out, device=hidden.device if self.offload else None)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        """Sample from the teacher, for sequence-level KD."""
        self.model.eval()
        if self.offload:
            self.model.to(kwargs["input_ids"].device)
        try:
            return self.model.generate(**kwargs)
        finally:
            if self.offload:
                self.model.to("cpu")
