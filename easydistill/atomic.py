"""Writing files and folders so that they appear complete or not at all.

Everything is written under a temporary name in the destination's own folder (same file system), flushed to
disk, then renamed: a rename is atomic, so a reader (or a run that resumes after a kill) sees the old state
or the new one, never half of a file. Temporary names start with a dot and carry `.partial`, `.tmp-<pid>` or
`.replaced-<pid>`; `remove_stale_partials` clears the ones a killed process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# Temporary names written by this module, by checkpoints and exports; the pid, when there is one, says whose.
PARTIAL_NAME = re.compile(r"^\..+\.(?:partial|partial-(\d+)|tmp-(\d+)|replaced-(\d+))$")


def _fsync_one(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems refuse to open folders; the rename still orders the writes
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file, or every file of a folder and the folders themselves, to disk."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            fsync_path(child)
    _fsync_one(path)


def replace_path(source: Path, target: Path) -> None:
    """Move `source` to `target` atomically, replacing what is there (a folder is moved aside first)."""
    source, target = Path(source), Path(target)
    fsync_path(source)
    if target.is_dir() and not target.is_symlink():
        aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, target)
    _fsync_one(target.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    replace_path(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path, only: str | None = None) -> list[Path]:
    """Remove the temporary files and folders a killed run left in `folder`; returns what was removed.

    Names with a pid are removed only when that process is gone (same machine); `only` keeps to names of
    one destination (e.g. "merged_model")."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = PARTIAL_NAME.match(entry.name)
        if not match or (only is not None and not entry.name.startswith(f".{only}.")):
            continue
        pid = next((int(g) for g in match.groups() if g), None)
        if pid is not None and _alive(pid) and pid != os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
