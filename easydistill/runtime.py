"""Which process this is, and printing once for all of them: the rank helpers the library shares."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print on the first process only, so that several ranks do not repeat every line."""
    if is_main_process():
        print(*args, **kwargs, flush=True)
