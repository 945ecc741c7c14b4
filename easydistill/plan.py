"""A memory plan before anything loads: what one KD training step holds on each device, term by term.

    python -m easydistill.plan --config configs/kd_white_box.json
    python -m easydistill.plan --config configs/kd_white_box.json --measure 3   # CPU: run 3 steps, compare

Prints what one KD training step holds on each device, term by term (weights, gradients, optimizer states,
activations, the loss's tensors) and the step's peak, from config.json files alone: no weights load. The
accounting and its assumptions are easydistill/memory_plan.py's docstring and docs/memory.md; `--measure N`
runs N real steps on the CPU in a fresh process (easydistill/memory_measure.py) and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import config_parser, load_and_check, run
from easydistill.errors import UserError
from easydistill.memory_measure import measure
from easydistill.memory_plan import MIB, make_plan
from easydistill.runtime import print0


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.plan", __doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    parser.add_argument(
        "--measure", type=int, metavar="STEPS", help="then train STEPS steps on the CPU and compare (slow)"
    )
    args = parser.parse_args(argv)
    if args.measure is not None and args.measure < 1:
        raise UserError("--measure: at least 1 step")
    cfg, _ = load_and_check(args.config, check_output_dir=False)
    plan = make_plan(cfg)
    print0(f"memory plan for {cfg.source} (loss path: {plan.path})")
    print0(plan.table())
    for note in plan.notes:
        print0(f"assumes: {note}")
    result = {
        "peak_bytes": plan.peak,
        "path": plan.path,
        "sizes": plan.sizes.__dict__,
        "moments": plan.moments,
        "terms": [t.__dict__ for t in plan.terms],
        "notes": plan.notes,
    }
    if args.measure:
        measured = measure(args.config, args.measure)
        ratio = plan.peak / measured["tensor_peak_bytes"]
        print0(
            f"measured ({args.measure} steps, CPU): tensor peak {measured['tensor_peak_bytes'] / MIB:.1f} MiB, "
            f"process peak RSS {measured['peak_rss_bytes'] / MIB:.1f} MiB; plan / measured = {ratio:.2f}"
        )
        result["measured"] = measured
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
