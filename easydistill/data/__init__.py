"""Data: user files → normalised chat records → token ids + labels, plus collation.

One direction: `load_records` (formats, shapes, ids) → `render_and_tokenize` (template, label
masking, truncation) → `build_dataset` (stats, train/eval split, an Arrow file kept between runs) → `TokenizedDataset` +
`KDCollator` for the trainer. Every problem a user can cause raises `UserError` naming
`file:line` (JSONL, JSON list) or `file row N` (parquet). See docs/data.md.

Names are imported on first use, so that checking a data file (records.py, what `validate` runs) does not
import torch through the collator.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "collate": ("KDCollator", "TokenizedDataset"),
    "dataset": ("build_dataset",),
    "records": ("ROLES", "TEXT_FIELDS", "load_prompts", "load_records", "validate_data_file"),
    "render": ("V1_TEMPLATE", "render_prompt", "render_segments"),
    "tokenize": (
        "IGNORE_INDEX",
        "SPLITS",
        "DataStats",
        "TokenizedExample",
        "render_and_tokenize",
        "tokenized_hash",
    ),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
