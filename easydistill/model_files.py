"""What a model folder's files say, read as JSON: no torch, no transformers, nothing loaded."""

from __future__ import annotations

import json
from pathlib import Path


def model_config(path: str | Path) -> dict:
    """The folder's config.json as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


def embedding_rows(path: str | Path) -> int | None:
    """Rows of the model's embedding matrix (config `vocab_size`; a multimodal config's text part)."""
    config = model_config(path)
    rows = config.get("vocab_size")
    if rows is None:
        rows = (config.get("text_config") or {}).get("vocab_size")
    return rows
