"""Run the teacher once, before training: its answers to prompt-only data, and its top-k logits store.

    python -m easydistill.kd.infer --config configs/kd_white_box.json
    python -m easydistill.kd.infer --config configs/kd_white_box.json --import-v1 data/logits.json

For every teacher with a `logits_path` (dataset.logits_path, or logits_path in a models.teacher object), the
teacher scores the exact token ids training will see (train and eval examples) and stores, per label
position, its top `inference.top_logits_num` ids and log-probabilities plus the tail mass (docs/logits.md).
When `labeled_path` is missing and `instruction_path` is given (kd_white_box, kd_black_box_local), the teacher
first writes the answers. Interrupted runs resume; finished outputs are kept. `--import-v1 FILE` converts an
EasyDistill v1 logits file instead of running the teacher. kd.train runs the same step first by itself.
"""

from __future__ import annotations

from easydistill.cli import config_parser, load_and_check, run
from easydistill.runtime import print0


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.kd.infer", __doc__.splitlines()[0])
    parser.add_argument(
        "--import-v1",
        metavar="FILE",
        help="an EasyDistill v1 logits JSONL (one line per labeled record) to convert into the teacher's store",
    )
    args = parser.parse_args(argv)
    cfg, _ = load_and_check(args.config, check_output_dir=False, computing_stores=True)
    from easydistill.store.precompute import prepare_teacher_outputs
    from easydistill.store.topk import store_location

    cfg = prepare_teacher_outputs(cfg, import_v1=args.import_v1, compute_missing=True, log=print0)
    stores = [str(store_location(cfg, t)[0]) for t in cfg.teachers if t.kind == "cached"]
    print0(
        f"done: data {cfg.dataset.labeled_path}" + (f"; teacher logits {', '.join(stores)}" if stores else "")
    )
    return 0


if __name__ == "__main__":
    run(main)
