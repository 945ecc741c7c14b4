"""White-box knowledge distillation: the student learns the teacher's token distributions.

    python -m easydistill.kd.train --config configs/kd_white_box.json
    accelerate launch --multi_gpu --num_processes 2 -m easydistill.kd.train --config configs/kd_white_box.json

The config is validated (schema, cross-field rules, preflight on the model folders, no weights) before
anything loads; a problem ends the run with exit code 2 and a message naming its JSON path. Then what the
teacher must compute first is computed (as kd.infer does): its answers when only prompts are given, and for
kd_white_box a missing logits store; v1 logits files are converted. Several processes leave that to the
first one and wait for its files.
"""

from __future__ import annotations

from easydistill.cli import config_parser, load_and_check, run
from easydistill.runtime import is_main_process, print0


def main(argv=None, *, prog="python -m easydistill.kd.train") -> int:
    args = config_parser(prog, __doc__.splitlines()[0]).parse_args(argv)
    cfg, report = load_and_check(args.config)
    from easydistill.store.precompute import prepare_teacher_outputs
    from easydistill.train.trainer import run_training  # heavy imports only once the config is known good

    cfg = prepare_teacher_outputs(cfg, wait=not is_main_process(), log=print0)
    metrics = run_training(cfg, report)
    print0(f"done: {cfg.output_dir} (train loss {metrics.get('train_loss', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    run(main)
