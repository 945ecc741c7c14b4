"""Read a JSON config, report every problem at once (each with its JSON path), fill defaults, resolve.

Nothing heavy is imported here: validating a config costs milliseconds.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from easydistill.config.limits import structure_problems, value_problems
from easydistill.config.training_keys import (
    DROPPED_KEYS,
    OWN_KEYS,
    RENAMED_KEYS,
    SFT_KEYS,
    check_value_type,
    training_argument_types,
)
from easydistill.config.v1_compat import unsupported_job, v1_rules
from easydistill.config.view import Config, same_folder, teacher_entries
from easydistill.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("schema.json")


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read ({exc})"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to read (thousands of levels)"]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError([f"{path}: cannot be read as JSON ({exc})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"$: the config must be a JSON object, not {type(data).__name__}"], str(path))
    return data


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_error(error: jsonschema.ValidationError) -> list[str]:
    path = error.json_path
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in allowed]
        return [f"{path}.{k}: unknown key{_did_you_mean(k, allowed)}" for k in unknown]
    if error.validator == "anyOf":
        # Report the nested error when the value has the right outer shape (e.g. a list of teacher objects
        # with one misspelt key); otherwise say what shapes are accepted.
        # Type mismatches come from the branches of the wrong shape; what is left is the matching branch's.
        deeper = [
            e
            for e in error.context
            if len(e.absolute_path) > len(error.absolute_path) and e.validator not in ("type", "anyOf")
        ]
        if deeper:
            return _format_error(best_match(deeper))
        expected = error.schema.get("x-expected")
        if expected:
            return [f"{path}: {error.instance!r} is not {expected}"]
    if error.validator == "enum":
        options = ", ".join(repr(o) for o in error.validator_value)
        hint = _did_you_mean(str(error.instance), map(str, error.validator_value))
        return [f"{path}: {error.instance!r} is not one of {options}{hint}"]
    return [f"{path}: {error.message}"]


def schema_problems(raw: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
    problems: list[str] = []
    for error in sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path))):
        problems.extend(_format_error(error))
    return problems


# Loggers `training.report_to` may name, and the package each one needs.
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
EXTRAS = {"tensorboard"}  # loggers pyproject.toml offers as an extra


def _missing_loggers(report_to: Any) -> list[str]:
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n in LOGGER_PACKAGES and importlib.util.find_spec(LOGGER_PACKAGES[n]) is None]


def _normalise_training(training: dict[str, Any], notes: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Map v1-era spellings, check every key against the installed TrainingArguments."""
    fields = training_argument_types()
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in training.items():
        where = f"$.training.{key}"
        if key in RENAMED_KEYS:
            new = RENAMED_KEYS[key]
            notes.append(f"{where}: read as training.{new} (the key's name in the installed transformers)")
            if new in training:
                problems.append(f"{where}: given together with training.{new}; keep one")
                continue
            key = new
        if key in DROPPED_KEYS:
            notes.append(f"{where}: ignored ({DROPPED_KEYS[key]})")
            continue
        if key in SFT_KEYS or key in OWN_KEYS:
            out[key] = value
            continue
        if key not in fields:
            allowed = set(fields) | set(SFT_KEYS) | OWN_KEYS | set(RENAMED_KEYS)
            problems.append(f"{where}: unknown TrainingArguments key{_did_you_mean(key, allowed)}")
            continue
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            out[key] = value  # true: the newest checkpoint in output_dir
            continue
        if key == "report_to" and _missing_loggers(value):
            missing = ", ".join(_missing_loggers(value))
            extra = f'pip install "easydistill[{missing}]"' if missing in EXTRAS else f"pip install {missing}"
            problems.append(f"{where}: {missing} is not installed here ({extra}), or drop it")
            continue
        complaint = check_value_type(fields[key], value)
        if complaint:
            problems.append(f"{where}: {complaint}")
            continue
        out[key] = value
    return out, problems


def fill_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Fill schema defaults into objects, recursively; values the user gave are kept as they are."""
    if not isinstance(value, dict) or "properties" not in node:
        return value
    filled = dict(value)
    for key, sub in node["properties"].items():
        if key not in filled and "default" in sub:
            if sub["default"] is None:
                continue  # null defaults mean "absent"; the typed view reads them as None
            filled[key] = copy.deepcopy(sub["default"])
        if key in filled:
            filled[key] = fill_defaults(filled[key], sub)
    return filled


def _max_length(raw: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """v1 files may set the limit in training (SFT's max_length) instead of distillation.max_seq_length."""
    training = data["training"]
    given = {k: training.pop(k) for k in ("max_length", "max_seq_length") if k in training}
    problems = []
    for key, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            problems.append(f"$.training.{key}: {value!r} must be an integer of at least 2")
    if problems or not given:
        return problems
    values = set(given.values())
    explicit = raw.get("distillation", {}).get("max_seq_length")
    if explicit is not None:
        values.add(explicit)
    if len(values) > 1:
        keys = [f"training.{k}" for k in given] + (["distillation.max_seq_length"] if explicit else [])
        return [
            f"$.training.{next(iter(given))}: the sequence limit is set to different values by {', '.join(keys)}"
        ]
    data["distillation"]["max_seq_length"] = values.pop()
    return []


def cross_field_problems(
    data: dict[str, Any], warnings: list[str], raw: dict[str, Any] | None = None
) -> list[str]:
    """Rules that span blocks. `data` is schema-valid with defaults filled; `raw` is what the file said."""
    problems: list[str] = []
    raw_distill = (raw or data).get("distillation", {})
    job = data["job_type"]
    models, dataset, lora = data["models"], data["dataset"], data["lora"]
    distill = data["distillation"]
    teacher = models.get("teacher")
    logits = dataset.get("logits_path")
    entries = teacher_entries(data)

    problems += v1_rules(data, raw or data, warnings)
    if job.startswith("kd_white_box") and not entries:
        problems.append('$.models.teacher: a white-box job needs a teacher (a folder, "self", or a list)')
    if (
        job == "kd_white_box_train_only_multi"
        and not isinstance(teacher, list)
        and not isinstance(logits, list)
    ):
        problems.append("$.models.teacher: kd_white_box_train_only_multi needs a list of teachers")
    if isinstance(logits, list) and teacher is not None:
        n_teachers = len(teacher) if isinstance(teacher, list) else 1
        if len(logits) != n_teachers:
            problems.append(
                f"$.dataset.logits_path: {len(logits)} logits files for {n_teachers} teacher(s); "
                "they are paired by position, so the lists must have the same length"
            )
    teacher_objects = isinstance(teacher, list) and all(isinstance(t, dict) for t in teacher)
    if teacher_objects and logits is not None:
        problems.append(
            "$.dataset.logits_path: with teacher objects, give each one its own logits_path instead"
        )
    if teacher_objects and sum(float(t.get("weight", 1.0)) for t in teacher) <= 0:
        problems.append("$.models.teacher: the teacher weights sum to 0; at least one must be positive")

    student = models["student"]
    selfish = [
        i
        for i, e in enumerate(entries)
        if not e.get("logits_path")
        and (e.get("path") == "self" or (e.get("path") and same_folder(e["path"], student)))
    ]
    if selfish and not lora["enable"] and job.startswith("kd_white_box"):
        where = "$.models.teacher" if isinstance(teacher, str) else f"$.models.teacher[{selfish[0]}]"
        problems.append(
            f"{where}: a self-teacher is the student's own base weights with its LoRA adapters disabled, so "
            'self-distillation needs LoRA adapters on the student: add "lora": {"enable": true} '
            "(r, alpha and target_modules have defaults)"
        )
    if len(selfish) > 1:
        problems.append("$.models.teacher: the student can be its own teacher only once in a teacher list")
    schedule = distill.get("lmbda_schedule")
    only_student_samples = (
        (schedule["start"] == schedule["end"] == 1.0) if schedule else distill["lmbda"] == 1.0
    )
    no_cross_entropy = distill["kd_ratio"] == 1.0 or only_student_samples
    if selfish and lora["enable"] and no_cross_entropy and len(entries) == 1 and not lora.get("init_from"):
        warnings.append(
            "a fresh LoRA student equals its self-teacher (LoRA's B matrices start at 0), so the KD term and its "
            "gradient are exactly 0 on any text, the student's own samples included: only cross-entropy moves "
            "it. With kd_ratio = 1, or lmbda = 1 (every batch is the student's samples, scored by KD alone), "
            "nothing trains; use kd_ratio < 1 and lmbda < 1"
        )

    has_data = dataset.get("labeled_path") or (
        job in ("kd_white_box", "kd_black_box_local") and dataset.get("instruction_path")
    )
    if not has_data and job != "kd_black_box_api":  # api_job_rules says what to change
        problems.append(
            "$.dataset.labeled_path: required (the training records); or give instruction_path "
            "with kd_white_box / kd_black_box_local so that the teacher writes the answers"
        )
    if job == "kd_black_box_local" and teacher is None and not dataset.get("labeled_path"):
        problems.append(f"$.models.teacher: {job} needs a teacher to write the answers")
    on_policy = distill["lmbda"] > 0 or bool(distill.get("lmbda_schedule")) or distill["seq_kd"]
    raw_inference = (raw or data).get("inference", {})
    if on_policy and raw_distill.get("temperature", 1.0) != 1.0 and "temperature" not in raw_inference:
        t = raw_distill["temperature"]
        warnings.append(
            f"$.distillation.temperature: {t:g} scales the loss only; on-policy / seq_kd completions are sampled "
            f"at inference.temperature (unset: 1). Earlier releases sampled at distillation.temperature: set "
            f'"inference": {{"temperature": {t:g}}} to sample as they did'
        )
    if distill.get("lmbda_schedule") and "lmbda" in raw_distill:
        problems.append("$.distillation.lmbda_schedule: given together with distillation.lmbda; keep one")
    if on_policy and any(e.get("logits_path") for e in entries):
        problems.append(
            "$.distillation.lmbda: on-policy and seq_kd batches need teachers that score new text; "
            "stored logits only cover the dataset's tokens (remove logits_path or set lmbda to 0)"
        )
    if on_policy and job.startswith("kd_black_box"):
        problems.append(f"$.distillation.lmbda: {job} has no teacher distribution to match on generated text")
    if lora["enable"] is False and lora.get("save_merged_model"):
        warnings.append("$.lora.save_merged_model: ignored, LoRA is off (the full model is saved anyway)")
    return problems


def load_config(source: str | Path | dict[str, Any]) -> Config:
    """Validate and resolve a config file (or an already-parsed dict). Raises ConfigError with every problem."""
    where = None if isinstance(source, dict) else str(source)
    raw = source if isinstance(source, dict) else read_json(source)
    problems = structure_problems(raw)  # NaN, 1e400, 2**70, NUL, deep nesting: before anything recurses
    if problems:
        raise ConfigError(problems, where)
    raw = copy.deepcopy(raw)
    problems = schema_problems(raw)
    job_problem = unsupported_job(raw.get("job_type"))
    if job_problem:  # instead of the schema's did-you-mean towards a KD job that does something else
        problems = [job_problem, *(p for p in problems if not p.startswith("$.job_type:"))]
    notes: list[str] = []
    if isinstance(raw.get("training"), dict):
        training, training_problems = _normalise_training(raw["training"], notes)
        problems += training_problems
    if problems:
        raise ConfigError(problems, where)
    data = fill_defaults(raw, schema())
    data["training"] = training
    data.setdefault("training", {}).setdefault("overwrite_output_dir", False)
    problems += _max_length(raw, data)
    warnings: list[str] = list(notes)
    problems += cross_field_problems(data, warnings, raw) + value_problems(data)
    if problems:
        raise ConfigError(problems, where)
    return Config(data, schema(), where, warnings)
