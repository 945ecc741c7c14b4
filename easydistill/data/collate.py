"""Torch side: the dataset wrapper and the right-padding collator the trainer batches with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from easydistill.data.tokenize import IGNORE_INDEX, SPLITS, TokenizedExample


class TokenizedDataset(torch.utils.data.Dataset):
    """Wraps a list of TokenizedExample; item i carries `sample_index = i` for teacher-row lookup.

    Train and eval examples are numbered in their own split, so each item also carries `sample_split`
    (0 train, 1 eval: the index into SPLITS, from the examples' `split`): (split, index) names one sample.

    With the Hugging Face Trainer set `remove_unused_columns=False`: otherwise it strips
    `sample_index` (not a forward() argument) before collation, and KDCollator refuses the batch.
    """

    def __init__(self, examples: list[TokenizedExample]):
        # A sequence (list or data.table.ExampleTable) is kept as it is: rows are read when batched.
        self.examples = examples if isinstance(examples, Sequence) else list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "sample_index": i,
            "sample_split": SPLITS.index(ex.split),
        }

    def sample_id(self, i: int) -> str:
        return self.examples[i].sample_id


class KDCollator:
    """Right-pads a batch: input_ids / attention_mask / labels (B, L), sample_index and sample_split (B,)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("KDCollator needs a pad_token_id (use the eos id if the tokenizer has no pad)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _row(feature) -> tuple[list[int], list[int], int, int]:
        if isinstance(feature, TokenizedExample):
            return feature.input_ids, feature.labels, feature.sample_index, SPLITS.index(feature.split)
        if not isinstance(feature, Mapping):
            raise TypeError(
                f"KDCollator expects TokenizedExample or dict items, got {type(feature).__name__}"
            )
        if "sample_index" not in feature:
            raise ValueError(
                "batch item has no 'sample_index'; with the Hugging Face Trainer set "
                "remove_unused_columns=False so it keeps the column teacher rows are looked up by"
            )
        if "labels" not in feature:
            raise ValueError("batch item has no 'labels'; KDCollator never trains on unmasked prompts")
        ids = torch.as_tensor(feature["input_ids"]).tolist()
        labels = torch.as_tensor(feature["labels"]).tolist()
        return ids, labels, int(feature["sample_index"]), int(feature.get("sample_split", 0))

    def __call__(self, features) -> dict[str, torch.Tensor]:
        rows = [self._row(f) for f in features]
        if not rows:
            raise ValueError("KDCollator got an empty batch")
        length = max(len(ids) for ids, *_ in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, labs, *_) in enumerate(rows):
            if len(labs) != len(ids):
                raise ValueError(f"batch item {b}: {len(labs)} labels for {len(ids)} input ids")
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
            labels[b, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_index": torch.tensor([row[2] for row in rows], dtype=torch.long),
            "sample_split": torch.tensor([row[3] for row in rows], dtype=torch.long),
        }
