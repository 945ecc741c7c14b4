"""A teacher read from a precomputed top-k store (easydistill/store/topk.py) instead of run online.

Rows are found by sample, never by step: a batch carries each example's `sample_index` (its position in its
split, in dataset order) and `sample_split` (0 train, 1 eval); the store lists each split's samples in the
same order, so (split, index) -> sample id -> its rows. Before use, every example's token ids are hashed and
compared with the hash stored with its rows, and its label count with its row count: a store computed for
other data (other file, template, max_seq_length, tokenizer) stops the run naming the sample, whatever the
shuffling, accumulation, number of ranks or resume point. Rows come back as `loss.rows.SparseRows`.
"""

from __future__ import annotations

import numpy as np
import torch

from easydistill.config import TeacherSpec
from easydistill.data import SPLITS, tokenized_hash
from easydistill.errors import UserError
from easydistill.loss.rows import SparseRows
from easydistill.store.topk import TopKLogitsStore


class CachedTeacher:
    """The Teacher interface (teachers/__init__.py) over a store: `rows` returns SparseRows; there is no model, so
    it does not project (`projects` False) and cannot generate."""

    projects = False
    head = None

    def __init__(self, spec: TeacherSpec, store: TopKLogitsStore):
        self.spec = spec
        self.store = store
        self._told_no_eval = False

    def hidden_rows(self, batch, mask):
        raise NotImplementedError(
            f"teacher {self.spec.name!r} is stored logits: it has rows, no hidden states"
        )

    def head_logits(self, hidden, out=None):
        raise NotImplementedError(f"teacher {self.spec.name!r} is stored logits: it has no output head")

    def generate(self, **kwargs):
        raise NotImplementedError(f"teacher {self.spec.name!r} is stored logits: it cannot write new text")

    @classmethod
    def open(cls, spec: TeacherSpec, cfg) -> CachedTeacher:
        """Open the teacher's store (see logits_store.store_location) and check it fits the student."""
        from easydistill.model_files import embedding_rows
        from easydistill.store.topk import store_location

        path, _ = store_location(cfg, spec)
        store = TopKLogitsStore(path)
        student_rows = embedding_rows(cfg.models.student)
        if student_rows < store.vocab_width:
            raise UserError(
                f"teacher {spec.name!r}: the store {path} covers {store.vocab_width} vocabulary columns but the "
                f"student has {student_rows}; it was computed for another student"
            )
        if store.vocab_map is not None:
            check_vocab_map(store, spec, cfg, student_rows)
        return cls(spec, store)

    def _empty(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows with all mass in the tail: every divergence is exactly 0 there."""
        k = self.store.top_k
        return np.full((n, k), -1), np.full((n, k), -np.inf, np.float16), np.zeros(n, np.float16)

    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> SparseRows:
        """The stored rows of the positions `mask` (B, T-1) selects, in the same order as the student's rows."""
        index = batch["sample_index"].tolist()
        split = batch["sample_split"].tolist() if "sample_split" in batch else [0] * len(index)
        counts = mask.sum(1).tolist()
        pieces = []
        for b, (i, s, n) in enumerate(zip(index, split, counts)):
            name = SPLITS[s]
            if name == "eval" and self.store.count("eval") == 0:
                if not self._told_no_eval:
                    print(
                        f"note: teacher {self.spec.name!r}: {self.store.path} holds no eval rows; eval KD is 0"
                    )
                    self._told_no_eval = True
                pieces.append(self._empty(n))
                continue
            entry = self.store.entry(name, i)
            tokens = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            if tokenized_hash(tokens) != entry.hash or n != entry.length:
                raise UserError(
                    f"teacher {self.spec.name!r}: the stored rows of {name} sample {entry.sample_id!r} were computed "
                    f"on other token ids than this run's ({self.store.path}); the data, template, max_seq_length or "
                    "tokenizer changed since kd.infer: delete the store and compute it again"
                )
            pieces.append(self.store.read(entry))
        ids = torch.from_numpy(np.concatenate([p[0] for p in pieces]))
        log_probs = torch.from_numpy(np.concatenate([p[1] for p in pieces]).astype(np.float32))
        tail = torch.from_numpy(np.concatenate([p[2] for p in pieces]).astype(np.float32))
        return SparseRows(ids, log_probs, tail, self.store.vocab_width).to(mask.device)


def check_vocab_map(store: TopKLogitsStore, spec: TeacherSpec, cfg, student_rows: int) -> None:
    """Rows projected from another tokenizer must have gone through the map this run would build (same
    tokenizers, same student width); checked when the teacher's folder is still there to rebuild it from."""
    import os

    if not (spec.path and os.path.isdir(spec.path)):
        print(
            f"note: teacher {spec.name!r}: {store.path} holds projected rows (map {store.vocab_map}); no teacher "
            "folder to check the map against"
        )
        return
    from easydistill.data.cross_pair import CrossPair
    from easydistill.loss.projection import map_digest
    from easydistill.models import load_tokenizer

    trust = cfg.models.trust_remote_code
    pair = CrossPair(load_tokenizer(cfg.models.student, trust), load_tokenizer(spec.path, trust))
    digest = map_digest(torch.tensor(pair.vocab_map.teacher_to_student), student_rows)
    if digest != store.vocab_map:
        raise UserError(
            f"teacher {spec.name!r}: the rows in {store.path} went through vocabulary map {store.vocab_map}, but the "
            f"tokenizers of {spec.path} and {cfg.models.student} give map {digest}: delete the store and run kd.infer"
        )
