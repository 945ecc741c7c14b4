"""From a data file to the train and eval examples of a run: tokenized once, kept, then mapped.

`build_dataset` streams the file (records.py), tokenizes a record at a time into an Arrow file (table.py) and
splits by sample id. The Arrow files, the split's row numbers, the stats and what was dropped are kept under
the cache (cache.py, `tokenized/<key>/`); the next run with the same file, tokenizer, template, max_length
and split maps them in a moment instead of tokenizing again. Either way the run holds only the rows it
batches: memory does not grow with the data file (a first run keeps each record's id, for the split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from array import array
from dataclasses import asdict
from pathlib import Path

import numpy as np

from easydistill.atomic import remove_stale_partials, replace_path
from easydistill.data.cache import cache_key, cache_root, file_identity
from easydistill.data.records import iter_records
from easydistill.data.table import ExampleTable, ExampleWriter
from easydistill.data.tokenize import IGNORE_INDEX, DataStats, char_budget, eval_ids, tokenize_record
from easydistill.errors import UserError

logger = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of what decides how the tokenizer turns text into ids (None: it cannot be described)."""
    try:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    except Exception:  # a tokenizer-like object without either: tokenized in memory, never cached
        return None
    extras = [
        bool(getattr(tokenizer, "is_fast", False)),
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "special_tokens_map", None),
    ]
    digest = hashlib.blake2b(body.encode(), digest_size=16)
    digest.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def build_dataset(
    path, tokenizer, *, template_path=None, max_length, eval_ratio=0.0, eval_path=None, seed=42
):
    """(train, eval, stats): ExampleTables of TokenizedExample. `eval_path`, when given, is the eval set and
    `eval_ratio` is ignored; otherwise `eval_ratio` of the records (by a seeded shuffle of their ids) is."""
    if max_length is None or max_length <= 0:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}")
    if eval_path is not None and eval_ratio:
        logger.warning("eval_path is set, so eval_ratio=%s is ignored", eval_ratio)
        eval_ratio = 0.0
    fingerprint = tokenizer_fingerprint(tokenizer)
    folder = None
    if fingerprint is not None:
        files = [file_identity(f) if f else None for f in (path, eval_path, template_path)]
        folder = cache_root() / "tokenized" / cache_key(files, fingerprint, max_length, eval_ratio, seed)
    built = _load(folder) if folder is not None and (folder / "meta.json").is_file() else None
    if built is None:
        built = _build(path, eval_path, tokenizer, template_path, max_length, eval_ratio, seed, folder)
    train, evaluation, stats, dropped = built
    if stats.n_dropped:
        logger.warning(
            "dropped %d example(s) with no response token within max_length=%d, e.g. %s",
            stats.n_dropped,
            max_length,
            ", ".join(dropped),
        )
    if not len(train):
        raise UserError(
            f"{path}: no training example left: all {stats.n_records - len(evaluation)} were dropped because "
            f"max_length={max_length} leaves no response token (longest example: {stats.max_len_seen})"
        )
    return train, evaluation, stats


def _load(folder: Path):
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = ExampleTable(folder / "examples.arrow", np.load(folder / "train_rows.npy"), "train")
        evaluation = ExampleTable(folder / meta["eval_file"], np.load(folder / "eval_rows.npy"), "eval")
        return train, evaluation, DataStats(**meta["stats"]), meta["dropped"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged or from another version: build again
        return None


def _staging(folder: Path | None) -> Path | None:
    if folder is None:
        return None
    try:
        remove_stale_partials(folder.parent)
        staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging
    except OSError:  # a cache that cannot be written: tokenize in memory
        return None


def _build(path, eval_path, tokenizer, template_path, max_length, eval_ratio, seed, folder):
    staging = _staging(folder)
    stats, dropped = DataStats(), []
    budget = char_budget(tokenizer, max_length)

    def tokenize_file(file, name: str):
        writer = ExampleWriter(staging / name if staging else None)
        ids, rows = [], array("q")
        for record in iter_records(file):
            example, full_len, truncated, clipped = tokenize_record(
                record, tokenizer, template_path, max_length, budget
            )
            stats.max_len_seen = max(stats.max_len_seen, full_len)
            stats.n_truncated += truncated
            stats.n_clipped += clipped
            ids.append(record["id"])
            if example is None:
                stats.n_dropped += 1
                if len(dropped) < 3:
                    dropped.append(record["source"])
                rows.append(-1)
                continue
            stats.n_response_tokens += sum(t != IGNORE_INDEX for t in example.labels)
            rows.append(writer.add(example))
        buffer = writer.close()
        return (buffer if buffer is not None else name), ids, np.frombuffer(rows, dtype=np.int64)

    source, ids, rows = tokenize_file(path, "examples.arrow")
    if eval_path is not None:
        eval_source, eval_record_ids, eval_rows = tokenize_file(eval_path, "eval.arrow")
        train_rows, eval_rows = rows[rows >= 0], eval_rows[eval_rows >= 0]
        stats.n_records = len(ids) + len(eval_record_ids)
    else:
        held = eval_ids(ids, eval_ratio, seed)
        is_eval = np.fromiter((i in held for i in ids), dtype=bool, count=len(ids))
        train_rows, eval_rows = rows[(rows >= 0) & ~is_eval], rows[(rows >= 0) & is_eval]
        eval_source = source
        stats.n_records = len(ids)
    if staging is None:
        return (
            ExampleTable(source, train_rows, "train"),
            ExampleTable(eval_source, eval_rows, "eval"),
            stats,
            dropped,
        )
    np.save(staging / "train_rows.npy", train_rows)
    np.save(staging / "eval_rows.npy", eval_rows)
    meta = {"stats": asdict(stats), "dropped": dropped, "eval_file": eval_source}
    (staging / "meta.json").write_text(json.dumps(meta) + "\n")  # last: a folder with it is complete
    replace_path(staging, folder)
    return _load(folder)
