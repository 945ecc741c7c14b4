"""What data work is kept between runs: tokenized examples, and which data files were already checked.

Both live under one folder, `$EASYDISTILL_CACHE` or `~/.cache/easydistill` (safe to delete at any time):

    tokenized/<key>/   the examples of one data file as one tokenizer, template and max_length make them
    validated/<key>    a data file's record count, once every record of it was checked

A key is a hash of everything the result depends on; a data file counts by its resolved path, size and
modification time and the bytes at both ends (hashing all of a large file would cost what the cache saves). Pure Python: `validate`
reads it without importing torch. A cache that cannot be written is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from easydistill.atomic import write_text_atomic

CACHE_ENV = "EASYDISTILL_CACHE"
FORMAT = 1  # raise when what is stored, or how it is made, changes
EDGE = 64 * 1024


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "easydistill")


def file_identity(path) -> list:
    """(resolved path, size, modification time in ns, hash of its first and last 64 KB) of a file: an edit
    that keeps the size within one tick of the clock still changes the ends, in practice."""
    stat = os.stat(path)
    ends = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        ends.update(f.read(EDGE))
        if stat.st_size > EDGE:
            f.seek(max(EDGE, stat.st_size - EDGE))
            ends.update(f.read(EDGE))
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns, ends.hexdigest()]


def cache_key(*parts) -> str:
    from easydistill import __version__

    blob = json.dumps([FORMAT, __version__, *parts], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _validated_path(path, prompts: bool) -> Path:
    return cache_root() / "validated" / cache_key("validated", file_identity(path), prompts)


def read_validated(path, prompts: bool) -> int | None:
    try:
        return int(json.loads(_validated_path(path, prompts).read_text())["records"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_validated(path, prompts: bool, count: int) -> None:
    target = _validated_path(path, prompts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps({"records": count, "file": file_identity(path)}) + "\n")
    except OSError:
        pass
