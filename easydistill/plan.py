"""A memory plan before anything loads: what one KD training step holds on each device, term by term.

    python -m easydistill.plan --config configs/kd_white_box.json
    python -m easydistill.plan --config configs/kd_white_box.json --measure 3   # CPU: run 3 steps, compare
    python -m easydistill.plan --config configs/kd_self_lora.json --engine zero3 --devices 8   # per device

Prints what one KD training step holds on each device, term by term (weights, gradients, optimizer states,
activations, the loss's tensors) and the step's peak, from config.json files alone: no weights load. The
accounting and its assumptions are easydistill/memory_plan.py's docstring and docs/memory.md; `--measure N`
runs N real steps on the CPU in a fresh process (easydistill/memory_measure.py) and compares. `--engine`
(or training.deepspeed) adds the plan per device under DDP / ZeRO-2 / ZeRO-3 / FSDP2 (memory_sharding.py,
docs/distributed.md); with `--measure` it runs on that many CPU ranks under the engine and compares the
largest rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import config_parser, load_and_check, run
from easydistill.errors import UserError
from easydistill.memory_measure import measure
from easydistill.memory_plan import MIB, make_plan, read_arch
from easydistill.memory_sharding import ENGINES, EngineSpec, measure_on_ranks, per_device
from easydistill.runtime import print0


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.plan", __doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    parser.add_argument(
        "--measure", type=int, metavar="STEPS", help="then train STEPS steps on the CPU and compare (slow)"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="per device under this engine (default: none, or "
        "the stage of training.deepspeed); see docs/distributed.md",
    )
    parser.add_argument("--devices", type=int, default=1, help="devices the engine shards over")
    parser.add_argument("--offload-params", action="store_true", help="ZeRO-3 / FSDP2 parameter offload")
    parser.add_argument("--offload-optimizer", action="store_true", help="DeepSpeed optimizer offload")
    args = parser.parse_args(argv)
    if args.measure is not None and args.measure < 1:
        raise UserError("--measure: at least 1 step")
    cfg, _ = load_and_check(args.config, check_output_dir=False)
    plan = make_plan(cfg)
    print0(f"memory plan for {cfg.source} (loss path: {plan.path})")
    print0(plan.table())
    for note in plan.notes:
        print0(f"assumes: {note}")
    device = engine_plan(cfg, plan, args)
    if device is not None:
        print0("\n" + device.table())
    result = {
        "peak_bytes": plan.peak,
        "path": plan.path,
        "sizes": plan.sizes.__dict__,
        "moments": plan.moments,
        "terms": [t.__dict__ for t in plan.terms],
        "notes": plan.notes,
    }
    if device is not None:
        result["per_device"] = {
            "engine": device.spec.__dict__,
            "peak_bytes": device.peak,
            "moments": device.moments,
        }
    if args.measure:
        if device is None:
            measured, planned, where = measure(args.config, args.measure), plan.peak, "CPU"
            figure, name = measured["tensor_peak_bytes"], "tensor peak"
        else:
            measured = measure_on_ranks(args.config, args.measure, device.spec)
            planned = device.peak
            where = f"CPU, {device.spec.name} on {device.spec.devices} ranks, largest rank"
            figure, name = measured["engine_peak_bytes"], "weights + RSS growth in train()"
        print0(
            f"measured ({args.measure} steps, {where}): {name} {figure / MIB:.1f} MiB, process peak RSS "
            f"{measured['peak_rss_bytes'] / MIB:.1f} MiB; plan / measured = {planned / figure:.2f}"
        )
        result["measured"] = measured
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def engine_plan(cfg, plan, args):
    """The per-device plan under the engine asked for (flags, or training.deepspeed), None for one device."""
    if args.devices < 1:
        raise UserError("--devices: at least 1")
    deepspeed = cfg.training.deepspeed
    if args.engine:
        spec = EngineSpec(args.engine, args.devices, args.offload_params, args.offload_optimizer)
    elif isinstance(deepspeed, str):
        spec = EngineSpec.from_deepspeed_file(deepspeed, args.devices)
    elif args.devices > 1:
        spec = EngineSpec("ddp", args.devices)
    else:
        return None
    spec.teacher_placement = (
        "offload" if cfg.models.teacher_offload else cfg.models.teacher_placement or "auto"
    )
    trust = cfg.models.trust_remote_code
    archs = {t.name: read_arch(t.path, trust) for t in cfg.teachers if t.kind == "online"}
    return per_device(plan, spec, read_arch(cfg.models.student, trust), archs)


if __name__ == "__main__":
    run(main)
