"""Knowledge distillation from several teachers (EasyDistill v1's kd_white_box_train_only_multi).

    python -m easydistill.kd.multi_train --config configs/kd_white_box_multi.json

Runs the same loop as kd.train: a single teacher is a list of one. Teachers are weighted (weights are
normalised) and run one at a time under no_grad.
"""

from __future__ import annotations

from easydistill.cli import run
from easydistill.kd.train import main as train_main


def main(argv=None) -> int:
    return train_main(argv, prog="python -m easydistill.kd.multi_train")


if __name__ == "__main__":
    run(main)
