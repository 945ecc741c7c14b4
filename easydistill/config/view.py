"""A typed, read-only view of a resolved config, and the teacher list every entry point works from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TeacherKind = Literal["online", "self", "cached"]


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run. A single teacher is a list of one."""

    name: str
    kind: TeacherKind
    path: str | None  # model folder (None for "self" and for stored logits without a model)
    logits_path: str | None
    weight: float  # normalised: the weights of a run sum to 1
    temperature: float


@dataclass(frozen=True)
class KDLoss:
    """The run's loss, built once from the config (`Config.loss`) and handed to the trainer, `train.step.kd_step`
    and `loss/`: total = ((1 − kd_ratio)·CE + kd_ratio·KD) / (label tokens of the optimizer step).
    Each teacher adds its own weight and temperature (`TeacherSpec`)."""

    kd_ratio: float  # 0 when nothing is distilled (black-box jobs, no teacher)
    kind: str  # distillation.distillation_type: one of loss.divergence.KINDS
    beta: float  # jsd's mixture weight
    skew_alpha: float  # the skew KLs' mixture weight
    combine: str  # how several teachers combine: loss.combine.COMBINES
    temperature: float  # the student's softmax temperature (teachers default to it)
    # 0: the plain path; > 0: the fused chunked path, that many label positions at a time; "auto": resolved by the
    # trainer once the student and the device are known (train.step.choose_loss_path)
    chunk_size: int | str

    @classmethod
    def from_distillation(cls, d: dict[str, Any], distils: bool) -> KDLoss:
        """From the `distillation` block with its defaults filled; `distils` False sets kd_ratio to 0."""
        return cls(
            kd_ratio=float(d["kd_ratio"]) if distils else 0.0,
            kind=d["distillation_type"],
            beta=float(d["beta"]),
            skew_alpha=float(d["skew_alpha"]),
            combine=d["combine"],
            temperature=float(d["temperature"]),
            chunk_size=d["chunk_size"] if d.get("chunk_size") == "auto" else int(d.get("chunk_size") or 0),
        )


class Section:
    """Attribute access to one block; keys the schema knows but the file omits read as None."""

    def __init__(self, name: str, values: dict[str, Any], known: set[str]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_known", known)

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        if key in object.__getattribute__(self, "_known"):
            return None
        raise AttributeError(f"config block {self._name!r} has no key {key!r}")

    def __setattr__(self, key, value):
        raise AttributeError("config sections are read-only")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


class Config:
    """The resolved config: schema-valid, defaults filled, v1 spellings mapped."""

    BLOCKS = ("dataset", "inference", "distillation", "models", "training", "lora")

    def __init__(self, data: dict[str, Any], schema: dict[str, Any], source: str | None, warnings: list[str]):
        self.data = data
        self.source = source
        self.warnings = warnings
        self.job_type: str = data["job_type"]
        for block in self.BLOCKS:
            known = set(schema["properties"][block].get("properties", {}))
            if block == "training":
                from easydistill.config.training_keys import training_argument_types

                known |= set(training_argument_types())
            setattr(self, block, Section(block, data.get(block, {}), known))
        self.teachers: list[TeacherSpec] = resolve_teachers(data)
        self.loss = KDLoss.from_distillation(data["distillation"], self.is_white_box and bool(self.teachers))

    @property
    def max_length(self) -> int:
        return self.data["distillation"]["max_seq_length"]

    @property
    def output_dir(self) -> Path:
        return Path(self.data["training"]["output_dir"])

    @property
    def is_white_box(self) -> bool:
        return self.job_type.startswith("kd_white_box")

    @property
    def teacher_mode(self) -> str:
        if not self.teachers:
            return "none (cross-entropy on the labels)"
        kinds = sorted({t.kind for t in self.teachers})
        return ", ".join(kinds) if len(self.teachers) > 1 else kinds[0]

    def to_json(self) -> str:
        """The resolved config as JSON, secrets redacted (easydistill/redact.py): safe to write out."""
        from easydistill.redact import redacted_json

        return redacted_json(self.data)


def same_folder(a: str, b: str) -> bool:
    """True when two paths name one folder (symlinks and trailing slashes resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "teacher"


def teacher_entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    """models.teacher in any accepted shape as a list of {path?, logits_path?, weight?, temperature?, name?}."""
    teacher = data.get("models", {}).get("teacher")
    logits = data.get("dataset", {}).get("logits_path")
    if teacher is None:
        entries: list[dict[str, Any]] = []
    elif isinstance(teacher, str):
        entries = [{"path": teacher}]
    else:
        entries = [{"path": t} if isinstance(t, str) else dict(t) for t in teacher]
    # v1 pairs dataset.logits_path with the teachers by position.
    if logits is not None:
        paths = [logits] if isinstance(logits, str) else list(logits)
        if not entries:
            entries = [{} for _ in paths]
        for entry, path in zip(entries, paths):
            entry.setdefault("logits_path", path)
    return entries


def resolve_teachers(data: dict[str, Any]) -> list[TeacherSpec]:
    if data["job_type"].startswith("kd_black_box"):
        return []
    entries = teacher_entries(data)
    student = data["models"]["student"]
    default_temperature = data["distillation"]["temperature"]
    total = sum(float(e.get("weight", 1.0)) for e in entries) or 1.0
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        path = entry.get("path")
        if entry.get("logits_path"):
            kind: TeacherKind = "cached"
        elif path == "self" or (path is not None and same_folder(path, student)):
            kind, path = "self", None
        else:
            kind = "online"
        base = entry.get("name") or (
            "self" if kind == "self" else _safe_name(Path(path or entry["logits_path"]).name)
        )
        name = base if base not in seen else f"{base}-{i}"
        seen.add(name)
        specs.append(
            TeacherSpec(
                name=name,
                kind=kind,
                path=None if path == "self" else path,
                logits_path=entry.get("logits_path"),
                weight=float(entry.get("weight", 1.0)) / total,
                temperature=float(entry.get("temperature", default_temperature)),
            )
        )
    return specs
