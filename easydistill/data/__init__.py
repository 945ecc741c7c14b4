"""Data: user files → normalised chat records → token ids + labels, plus collation.

One direction: `load_records` (formats, shapes, ids) → `render_and_tokenize` (template, label
masking, truncation) → `build_dataset` (stats, train/eval split) → `TokenizedDataset` +
`KDCollator` for the trainer. Every problem a user can cause raises `UserError` naming
`file:line` (JSONL, JSON list) or `file row N` (parquet). See docs/data.md.
"""

from easydistill.data.collate import KDCollator, TokenizedDataset
from easydistill.data.records import ROLES, TEXT_FIELDS, load_prompts, load_records, validate_data_file
from easydistill.data.render import V1_TEMPLATE, render_prompt, render_segments
from easydistill.data.tokenize import (
    IGNORE_INDEX,
    SPLITS,
    DataStats,
    TokenizedExample,
    build_dataset,
    render_and_tokenize,
    tokenized_hash,
)

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "SPLITS",
    "TEXT_FIELDS",
    "V1_TEMPLATE",
    "DataStats",
    "KDCollator",
    "TokenizedDataset",
    "TokenizedExample",
    "build_dataset",
    "load_prompts",
    "load_records",
    "render_and_tokenize",
    "render_prompt",
    "render_segments",
    "tokenized_hash",
    "validate_data_file",
]
