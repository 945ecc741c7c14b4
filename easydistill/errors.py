"""Errors a user can cause and fix: entry points print them without a traceback and exit with code 2."""

from __future__ import annotations

import contextlib
import errno


class UserError(Exception):
    """A problem the user can fix (bad config, path, data line). Entry points print str(e) and exit 2."""


class ConfigError(UserError):
    """One or more problems in a config file; each line names the JSON path it is about."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


# File-system failures a user fixes (space, permissions, a read-only mount), with the reason each one gives.
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# How torch and safetensors report the same failures (they do not raise OSError).
_WRITE_MESSAGES = {
    "no space left": "no space left on the device",
    "storagefull": "no space left on the device",
    "file too large": _WRITE_ERRNOS[errno.EFBIG],
    "read-only file system": "read-only file system",
    "permission denied": "permission denied",
    "file write failed": "the file could not be written (no space left, or a file-size limit?)",
    "unexpected pos": "the file could not be written (no space left, or a file-size limit?)",
}


def write_failure(exc: BaseException, path=None) -> UserError | None:
    """The UserError a file-system failure amounts to (naming the file, else `path`), or None for other errors."""
    where = getattr(exc, "filename", None) or path
    reason = _WRITE_ERRNOS.get(getattr(exc, "errno", None))
    if reason is None and not isinstance(exc, OSError):
        text = str(exc).lower()
        reason = next((why for key, why in _WRITE_MESSAGES.items() if key in text), None)
    if reason is None:
        return None
    return UserError(
        f"{where}: {reason}; free space or fix permissions there, then run again" if where else reason
    )


@contextlib.contextmanager
def file_system_errors(path):
    """Inside, a full disk, a read-only mount or a permission problem ends as one UserError naming the path."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # torch and safetensors wrap these failures in their own error types
        error = write_failure(exc, path)
        if error is None:
            raise
        raise error from exc


class RunStopped(Exception):
    """The run stopped itself to protect what it would write (e.g. a non-finite loss). Entry points exit 3."""
