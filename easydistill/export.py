"""Saving what a run produced: adapter or model, tokenizer, and a merged model checked against the adapter.

The merged model is written to a temporary folder next to its destination, reloaded from disk, compared with
base + adapter on real inputs, and only then moved into place: a failed check or a kill leaves nothing
half-done (the temporary folder of a killed merge is removed by the next merge into the same place).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from easydistill.atomic import remove_stale_partials, replace_path
from easydistill.errors import UserError
from easydistill.faults import kill_point
from easydistill.model_checks import adapter_folder_problems
from easydistill.models import load_causal_lm, load_tokenizer
from easydistill.run_folder import MERGE_MARKER, replaced_input_problems

FP32_TOLERANCE = 1e-4  # max |logit difference|, merged vs adapter, both run in fp32
HALF_RELATIVE_TOLERANCE = 2e-2  # for bf16/fp16 merges: relative to the largest |logit|


class MergeCheckError(RuntimeError):
    pass


def _adapter_model(base: str, adapter: str, dtype: str, trust_remote_code: bool):
    from peft import PeftModel

    model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, missing target modules
        raise UserError(_wrong_base(base, adapter, exc)) from None


def _wrong_base(base: str, adapter: str, exc: Exception) -> str:
    import json

    said = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
    return (
        f"the adapter {adapter} does not fit the base model {base} ({detail[:300]}); pass the base it was "
        f"trained on" + (f" (its adapter_config.json says {said!r})" if said else "")
    )


@torch.no_grad()
def max_logit_difference(
    merged_dir: str | Path, base: str, adapter: str, input_ids: torch.Tensor, trust_remote_code: bool = False
) -> tuple[float, float]:
    """(max |merged - adapter| logits, max |adapter logits|), both models loaded from disk in fp32."""
    merged = load_causal_lm(str(merged_dir), dtype="float32", trust_remote_code=trust_remote_code).eval()
    reference = _adapter_model(base, adapter, "float32", trust_remote_code)
    ones = torch.ones_like(input_ids)
    a = merged(input_ids=input_ids, attention_mask=ones).logits
    b = reference(input_ids=input_ids, attention_mask=ones).logits
    return float((a - b).abs().max()), float(b.abs().max())


def sample_input_ids(tokenizer, texts: list[str] | None = None, length: int = 32) -> torch.Tensor:
    """A few real token sequences to compare models on (fixed random ids when no text is given)."""
    if texts:
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in texts[:4]]
        rows = [r for r in rows if r]
        if rows:
            width = min(len(r) for r in rows)
            return torch.tensor([r[:width] for r in rows])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (2, length), generator=generator)


def merge_adapter(
    base: str,
    adapter: str,
    out: str | Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    texts: list[str] | None = None,
    log=print,
) -> float:
    """Merge `adapter` into `base`, save to `out`, verify against base + adapter; returns the max difference."""
    out = Path(out)
    problems = adapter_folder_problems(adapter) + replaced_input_problems(base, adapter, out)
    if problems:
        raise UserError("\n".join(problems))
    if not (Path(base) / "config.json").is_file():
        raise UserError(f"{base}: no config.json (not a model folder)")
    tokenizer = load_tokenizer(
        adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base, trust_remote_code
    )
    merged = _adapter_model(base, adapter, dtype, trust_remote_code).merge_and_unload()
    remove_stale_partials(out.parent, only=out.name)  # left by an interrupted merge
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MERGE_MARKER).write_text(json.dumps({"base": str(base), "adapter": str(adapter)}) + "\n")
        del merged
        kill_point("merge")
        diff, scale = max_logit_difference(
            staging, base, adapter, sample_input_ids(tokenizer, texts), trust_remote_code
        )
        stored = dtype if dtype != "auto" else "as stored"
        limit = FP32_TOLERANCE if dtype == "float32" else HALF_RELATIVE_TOLERANCE * max(scale, 1.0)
        log(
            f"merged model check: max |logit difference| vs adapter = {diff:.3g} (limit {limit:.3g}, weights {stored})"
        )
        if not diff <= limit:
            raise MergeCheckError(
                f"the merged model's logits differ from the adapter model's by {diff:.3g} (> {limit:.3g}); "
                f"nothing was written to {out}"
            )
        replace_path(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return diff
