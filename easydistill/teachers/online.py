"""A separate frozen model: eval mode, no grad, never in the optimizer, in its own dtype."""

from __future__ import annotations

import contextlib

import torch

from easydistill.config import TeacherSpec
from easydistill.loss.rows import DenseRows
from easydistill.models import final_hidden_states, head_unsupported, project


class OnlineTeacher:
    """`offload`: the weights wait on the CPU and visit the batch's device only for their forward, so that
    several teachers share one device's memory one at a time."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, *, offload: bool = False):
        self.spec = spec
        self.model = model
        self.offload = offload
        self.projects = head_unsupported(model) is None
        if offload:
            self.model.to("cpu")

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @contextlib.contextmanager
    def _visiting(self, device):
        """Eval mode and no grad inside; with offload, the weights on `device` inside and on the CPU after."""
        self.model.eval()  # Trainer.train() calls .train() on what it knows; this model it does not know
        if self.offload:
            self.model.to(device)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> DenseRows:
        """The teacher's logits at the positions `mask` (B, T-1) selects: (N, V_t), row i predicting the same
        token as the student's row i."""
        with self._visiting(batch["input_ids"].device) as model:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return DenseRows(logits[:, :-1][mask])

    def hidden_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states at the positions `mask` (B, T-1) selects: (N, H_t), without
        computing any logits (`head_logits` turns a slice of them into logits, a chunk at a time)."""
        with self._visiting(batch["input_ids"].device) as model:
            return final_hidden_states(model, batch)[:, :-1][mask]

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, H_t) hidden states -> (n, V_t) logits through the teacher's output head, written into `out` when
        given and the head allows it (a plain Linear of out's dtype): check the result, not `out`."""
        # offload: the head visits the device for this slice only, like the body in hidden_rows
        return project(self.head, hidden, out, device=hidden.device if self.offload else None)

    def generate(self, **kwargs) -> torch.Tensor:
        """Sample from the teacher, for sequence-level KD."""
        with self._visiting(kwargs["input_ids"].device) as model:
            return model.generate(**kwargs)
