"""The quickstart's teacher: trained once with cross-entropy on the clean synthetic records through our own
trainer, cached under a key of everything that decides its weights, and reused by later runs.

    cached_teacher(recipe, tokenizer, train_path, cache_root, quiet)  # -> (folder, reused?)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from easydistill.runtime import print0
from examples import tiny_models

TEACHER_MARKER = "quickstart_teacher.json"  # written last into a cached teacher: its presence means complete
# Modules whose code decides the cached teacher's weights (a package counts with all its files); an edit
# to any of them retrains it. Named as modules, not paths, so that splitting a file does not break the key.
TEACHER_MODULES = (
    "examples.quickstart",
    "examples.quickstart_teacher",
    "examples.synthetic",
    "examples.tiny_models",
    "easydistill.data",
    "easydistill.models",
    "easydistill.train",
    "easydistill.loss",
    "easydistill.config",
)


def _source_hashes() -> dict[str, str]:
    """sha256 of every file of TEACHER_MODULES and of the v1 template, keyed by path inside the repository."""
    import importlib

    from easydistill.data import V1_TEMPLATE

    root = Path(__file__).resolve().parents[1]
    files = {V1_TEMPLATE.resolve()}
    for name in TEACHER_MODULES:
        path = Path(importlib.import_module(name).__file__).resolve()
        if path.name == "__init__.py":  # a package: its code and its data files (e.g. config/schema.json)
            files.update(p for p in path.parent.rglob("*") if p.suffix in (".py", ".json", ".jinja"))
        else:
            files.add(path)
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(files)
        if "__pycache__" not in f.parts
    }


def teacher_key(recipe, variant: dict | None = None) -> str:
    """Hash of what decides the teacher's weights: its recipe, the library versions, our source files, and
    `variant` (what another demo changes: architecture, tokenizer, template)."""
    import accelerate
    import tokenizers
    import torch
    import transformers

    parts = {
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if not k.startswith("student_")},
        "architecture": tiny_models.TEACHER,
        "versions": [
            torch.__version__,
            transformers.__version__,
            tokenizers.__version__,
            accelerate.__version__,
        ],
        "sources": _source_hashes(),
        **({"variant": variant} if variant else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def teacher_config(
    recipe, train_path: Path, init_dir: Path, out_dir: Path, quiet: bool, template="v1"
) -> dict:
    """Plain cross-entropy on the labels (a black-box job without a teacher) for the randomly initialised teacher.
    template: "v1" (the v1 ChatML Jinja file), or None for the tokenizer's own chat template."""
    from easydistill.data import V1_TEMPLATE

    dataset = {"labeled_path": str(train_path)}
    if template == "v1":
        dataset["template"] = str(V1_TEMPLATE)
    return {
        "$comment": "The quickstart's teacher: cross-entropy on the synthetic task, built by examples.quickstart",
        "job_type": "kd_black_box_train_only",
        "dataset": dataset,
        "distillation": {"max_seq_length": 64},
        "models": {"student": str(init_dir)},
        "training": {
            "output_dir": str(out_dir),
            "overwrite_output_dir": True,
            "max_steps": recipe.teacher_steps,
            "per_device_train_batch_size": recipe.teacher_batch,
            "learning_rate": recipe.teacher_lr,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,
            "weight_decay": 0.0,
            "logging_steps": max(recipe.teacher_steps // 4, 1),
            "save_strategy": "no",
            "seed": recipe.seed,
            "report_to": "none",
            "disable_tqdm": quiet,
        },
    }


def cached_teacher(
    recipe,
    tokenizer,
    train_path: Path,
    cache_root: Path,
    quiet: bool,
    *,
    arch: str = "qwen2",
    template="v1",
    name: str = "quickstart-teacher",
    variant: dict | None = None,
) -> tuple[Path, bool]:
    """(teacher folder, reused?). Trained in a temporary sibling and renamed into place when complete.
    arch, template (see `teacher_config`), name and variant (part of the cache key) let another demo train a
    teacher of its own, e.g. with another tokenizer (examples/cross_tokenizer_demo.py)."""
    from easydistill.config import load_config
    from easydistill.train.trainer import run_training

    key = teacher_key(recipe, variant)
    final = cache_root / f"{name}-{key}"
    if (final / TEACHER_MARKER).is_file():
        print0(f"teacher: reusing the cached teacher {final}")
        return final, True
    print0(f"teacher: training once with cross-entropy, {recipe.teacher_steps} steps (cached as {final})")
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-{key}-", dir=cache_root))
    try:
        rows = (len(tokenizer) // 64 + 1) * 64  # padded embedding rows, as Qwen ships them
        init = tiny_models.build_model(
            work / "init",
            arch=arch,
            tokenizer=tokenizer,
            padded_vocab=rows,
            seed=recipe.seed,
            **tiny_models.TEACHER,
        )
        out = work / "teacher"
        started = time.perf_counter()
        metrics = run_training(load_config(teacher_config(recipe, train_path, init, out, quiet, template)))
        marker = {"key": key, "recipe": dataclasses.asdict(recipe), "seconds": time.perf_counter() - started}
        marker["train_loss"] = metrics.get("train_loss")
        (out / TEACHER_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not (final / TEACHER_MARKER).is_file():
            shutil.rmtree(final)  # left half-written by something else: ours is complete
        try:
            os.replace(out, final)
        except OSError:  # another process renamed its complete copy into place first
            if not (final / TEACHER_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final, False
