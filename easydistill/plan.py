"""A memory plan before anything loads: what one KD training step holds on each device, term by term.

    python -m easydistill.plan --config configs/kd_white_box.json
    python -m easydistill.plan --config configs/kd_white_box.json --measure 3   # CPU: run 3 steps, compare

Parameter counts come from each model's config.json, built on the meta device (no weights read); LoRA
parameters from the targeted linear layers' shapes; bytes from the configured dtypes. The terms:

  weights      every parameter of the student, of each online teacher (a self-teacher shares the student's)
  gradients    one per trainable parameter, in its dtype (alive from backward until the optimizer step)
  optimizer    AdamW: exp_avg and exp_avg_sq per trainable parameter, in its dtype
  activations  what autograd saves for backward in each decoder layer (see `layer_activation_elements`)
  logits/loss  the tensors KDTrainer.compute_loss holds at its peak (see `loss_terms`)

and the peak of a step is the weights and optimizer states plus the largest of three moments: the loss's
forward (activations + its tensors), the start of backward (activations + the loss's saved tensors + the
gradients in flight), the optimizer step (every gradient). Assumed, and said in the output: every position of
every sequence is a label position and every batch is padded to max_seq_length (an upper bound for the logits
terms); a Llama-style decoder layer (RMSNorm, rotary attention with grouped KV heads, gated MLP: Llama, Qwen2,
Mistral) run by a fused attention kernel (no T x T matrix saved; with padding the KV heads are repeated to the
query heads); no gradient checkpointing unless the config turns it on; AdamW. Not counted: the CUDA context,
allocator caching and fragmentation, framework workspaces, the data loader. docs/memory.md explains the
accounting and how `--measure` (and tests/test_plan.py) compares it with a real run.
"""

from __future__ import annotations

import json
from pathlib import Path

from easydistill.cli import config_parser, load_and_check, run
from easydistill.errors import UserError
from easydistill.memory_plan import MIB, make_plan, measure
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
