"""Merge a LoRA adapter into its base model and check the result against base + adapter.

    python -m easydistill.merge --base models/student --adapter runs/kd/ --out runs/kd/merged_model

The output folder is a standalone model + tokenizer that AutoModelForCausalLM.from_pretrained loads alone.
It is written only when its logits match the adapter model's (max difference 1e-4 in fp32). --out is never
--base or --adapter (nor holds them), never a training run; --overwrite replaces only an earlier merge output.
The adapter's weights must be adapter_model.safetensors (a .bin adapter is a pickle and is refused).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import run
from easydistill.errors import UserError
from easydistill.model_checks import adapter_folder_problems
from easydistill.run_folder import merge_destination_problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easydistill.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder (adapter_config.json)")
    parser.add_argument("--out", required=True, help="where to write the merged model")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    problems = merge_destination_problems(args.base, args.adapter, args.out, args.overwrite)
    problems += [f"--adapter {p}" for p in adapter_folder_problems(args.adapter)]
    if problems:
        raise UserError("\n".join(problems))
    from easydistill.export import merge_adapter

    diff = merge_adapter(
        args.base, args.adapter, out, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    print(f"wrote {out} (max logit difference {diff:.3g})")
    return 0


if __name__ == "__main__":
    run(main)
