"""What every entry point shares: the same validation before anything heavy, and clean exits on user errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from easydistill.errors import RunStopped, UserError, write_failure
from easydistill.runtime import is_main_process, print0

EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 3


def offline_by_default() -> None:
    """Never reach for a model hub unless the user asked: folders are what configs name."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point: user errors print one readable message and exit 2, a run that stopped itself
    (non-finite loss) exits 3; neither with a traceback."""
    offline_by_default()
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as exc:  # a full disk, a read-only mount, a permission: the user's to fix, not a bug
        error = write_failure(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except RunStopped as exc:
        if is_main_process():  # every rank stops together; one says why
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUN_STOPPED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="path of the JSON run config")
    return parser


def load_and_check(config_path: str, *, check_output_dir: bool = True, computing_stores: bool = False):
    """The validation every entry point runs first: schema, cross-field rules, then preflight."""
    from easydistill.config import load_config
    from easydistill.preflight import preflight

    cfg = load_config(config_path)
    report = preflight(cfg, check_output_dir=check_output_dir, computing_stores=computing_stores)
    for line in cfg.warnings:
        print0(f"warning: {line}")
    for line in report.notes:
        print0(f"note: {line}")
    return cfg, report
