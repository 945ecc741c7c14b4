"""EasyDistill v1's command: `easydistill --config FILE` runs the job its job_type names.

    easydistill --config configs/kd_white_box.json
    python -m easydistill --config configs/kd_white_box.json

Every kd_* job runs through one loop (the same as python -m easydistill.kd.train): what the teacher must
compute first (its answers, its logits store), then training. The `easydistill` command finds this package
even from inside an EasyDistill v1 checkout, whose own easydistill/ folder shadows it under `python -m`.
"""

from __future__ import annotations

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import run
from easydistill.kd.train import main as train_main


def main(argv=None) -> int:
    return train_main(argv, prog="easydistill")


def console() -> None:
    """The `easydistill` console script."""
    run(main)


if __name__ == "__main__":
    console()
