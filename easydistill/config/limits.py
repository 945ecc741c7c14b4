"""Values the schema lets through but a run cannot use: NaN, infinities, integers past 64 bits, seeds numpy
refuses, batch sizes below one, a run that would train nothing, evaluation without eval data, optional packages
that are not installed. Each problem names its JSON path; nothing here imports more than the standard library.

The JSON reader accepts NaN, Infinity and numbers like 1e400 (read as infinity), so they are looked for in the
parsed value, by an iterative walk that also bounds the nesting (a deeply nested file must not crash the
schema check, which recurses).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

MAX_DEPTH = 32  # a config nests 5 levels; anything near this is a mistake or an attack
INT_LIMIT = 2**63 - 1  # what torch, numpy and the C libraries underneath take
SEED_LIMIT = 2**32 - 1  # numpy's seeds are unsigned 32-bit
SEEDS = (("training", "seed"), ("training", "data_seed"), ("dataset", "seed"), ("inference", "seed"))
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
POSITIVE_IF_GIVEN = ("logging_steps", "save_steps", "eval_steps")
NON_NEGATIVE = ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers")
# training.optim values -> the optional package they need (transformers imports it when training starts)
OPTIMIZER_PACKAGES = {
    "bnb": "bitsandbytes",
    "8bit": "bitsandbytes",
    "paged": "bitsandbytes",
    "galore": "galore_torch",
    "apollo": "apollo_torch",
    "lomo": "lomo_optim",
    "schedule_free": "schedulefree",
    "grokadamw": "grokadamw",
    "anyprecision": "torchdistx",
}


def _path(parts: tuple) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def structure_problems(raw: Any) -> list[str]:
    """Non-finite numbers, integers past 64 bits, NUL characters and nesting deeper than MAX_DEPTH."""
    problems: list[str] = []
    stack: list[tuple[tuple, Any]] = [((), raw)]
    while stack:
        parts, value = stack.pop()
        where = _path(parts)
        if isinstance(value, dict | list):
            if len(parts) >= MAX_DEPTH:
                problems.append(
                    f"{where}: nested more than {MAX_DEPTH} levels deep; no config key nests so deep"
                )
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((parts + (key,), item) for key, item in reversed(list(items)))
        elif isinstance(value, float) and not math.isfinite(value):
            spelled = (
                "NaN" if math.isnan(value) else "Infinity (or a number too large for a float, like 1e400)"
            )
            problems.append(f"{where}: {spelled} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
            problems.append(f"{where}: the integer {str(value)[:12]}... is too large (limit {INT_LIMIT})")
        elif isinstance(value, str) and "\x00" in value:
            problems.append(f"{where}: contains a NUL character (\\u0000), which no path or name may hold")
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def value_problems(data: dict[str, Any]) -> list[str]:
    """Cross-key checks on the resolved config (schema-valid, defaults filled, training keys normalised)."""
    training, problems = data.get("training", {}), []
    for block, key in SEEDS:
        value = data.get(block, {}).get(key)
        if _number(value) and not 0 <= value <= SEED_LIMIT:
            problems.append(
                f"$.{block}.{key}: {value} is out of range; a seed is an integer from 0 to {SEED_LIMIT}"
            )
    for key in AT_LEAST_ONE:
        value = training.get(key)
        if _number(value) and value < 1:
            problems.append(f"$.training.{key}: {value} must be at least 1")
    for key in POSITIVE_IF_GIVEN:
        value = training.get(key)
        if _number(value) and value <= 0:
            problems.append(f"$.training.{key}: {value} must be positive")
    for key in NON_NEGATIVE:
        value = training.get(key)
        if _number(value) and value < 0:
            problems.append(f"$.training.{key}: {value} must not be negative")
    return problems + _length_problems(training) + _eval_problems(data) + package_problems(training)


def _length_problems(training: dict[str, Any]) -> list[str]:
    """A run that trains nothing would save the untrained student as its result: refused."""
    steps, epochs = training.get("max_steps"), training.get("num_train_epochs")
    if _number(steps) and (steps == 0 or steps < -1):
        return [
            f"$.training.max_steps: {steps} trains nothing; give a positive number of optimizer steps, or -1 "
            "(the default) to train for num_train_epochs"
        ]
    if _number(epochs) and epochs <= 0 and not (_number(steps) and steps > 0):
        return [
            f"$.training.num_train_epochs: {epochs} trains nothing (and would save the untrained student as the "
            "result); give a positive number of epochs, or a positive training.max_steps"
        ]
    return []


def _eval_problems(data: dict[str, Any]) -> list[str]:
    training, dataset = data.get("training", {}), data.get("dataset", {})
    has_eval = bool(dataset.get("eval_path")) or bool(dataset.get("eval_ratio"))
    strategy = training.get("eval_strategy")
    problems = []
    if strategy not in (None, "no") and not has_eval:
        problems.append(
            f"$.training.eval_strategy: {strategy!r} evaluates during training, but there is no eval data; set "
            "dataset.eval_path or dataset.eval_ratio, or eval_strategy 'no'"
        )
    if training.get("load_best_model_at_end") and not has_eval:
        problems.append(
            "$.training.load_best_model_at_end: needs eval data (dataset.eval_path or eval_ratio)"
        )
    return problems


def package_problems(training: dict[str, Any]) -> list[str]:
    """Training options whose package is optional and not installed, named before anything loads."""
    needs = []
    optim = str(training.get("optim") or "")
    package = next((p for key, p in OPTIMIZER_PACKAGES.items() if key in optim), None)
    if package:
        needs.append(("optim", f"{optim!r}", package))
    if training.get("deepspeed"):
        needs.append(("deepspeed", "a DeepSpeed config", "deepspeed"))
    if training.get("use_liger_kernel"):
        needs.append(("use_liger_kernel", "true", "liger_kernel"))
    return [
        f"$.training.{key}: {what} needs the {package} package, which is not installed here "
        f"(pip install {package.replace('_', '-')})"
        for key, what, package in needs
        if importlib.util.find_spec(package) is None
    ]
