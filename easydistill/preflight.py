"""Checks that need the files a config names but no weights: folders, tokenizers, LoRA targets, data.

Everything here reads files as they are (config.json, tokenizer files, the safetensors headers: see
model_files.py) without importing torch or transformers, so `validate` answers in well under a second even
for a 70B teacher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from easydistill.config import Config
from easydistill.errors import ConfigError, UserError
from easydistill.model_checks import adapter_folder_problems, model_folder_problems, weights_problems
from easydistill.model_files import (
    embedding_rows,
    matches,
    model_config,
    module_names,
    parameter_shapes,
    same_tokenizer_files,
    tokenizer_vocab,
)
from easydistill.preflight_cross import check_cross_pair
from easydistill.run_folder import RUN_CONFIG as RUN_MARKER  # noqa: F401  (older name)
from easydistill.run_folder import output_dir_problems
from easydistill.store.answer_files import check_existing_answers, writes_answers


@dataclass
class PreflightReport:
    notes: list[str] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)
    linear_modules: list[str] = field(default_factory=list)
    vocab: dict[str, int] = field(default_factory=dict)  # folder name -> embedding rows
    template_preview: list[str] = field(default_factory=list)  # dataset.template on the first record


def _model_folder(path: str, where: str, problems: list[str], *, weights: bool = True) -> bool:
    folder = Path(path)
    if not folder.is_dir():
        problems.append(f"{where}: {path!r} is not a folder")
        return False
    if not (folder / "config.json").is_file():
        problems.append(f"{where}: {path!r} holds no config.json (expected a save_pretrained model folder)")
        return False
    # Read as bytes: config.json, tokenizer files, the weights' safetensors headers against the files' sizes.
    found = model_folder_problems(folder, needs_weights=False)
    problems.extend(f"{where}: {p}" for p in found + (weights_problems(folder) if weights else []))
    return not found  # the tokenizers can be compared (broken weights do not stop that)


def _vocab(path: str, trust_remote_code: bool) -> dict[str, int]:
    vocab = tokenizer_vocab(path)
    if vocab is None:  # a sentencepiece model only: transformers converts it (the one slow case)
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
    return vocab


def _compare_tokenizers(cfg: Config, folders: dict[str, str], problems: list[str], report: PreflightReport):
    """Same tokenizer (vocab and merges-derived ids) for the student and every teacher with a folder."""
    student_where = "$.models.student"
    student = folders[student_where]
    try:
        ref_vocab = _vocab(student, cfg.models.trust_remote_code)
    except Exception as exc:  # a broken tokenizer file is the user's to fix
        problems.append(f"{student_where}: cannot load the tokenizer from {student!r}: {exc}")
        return
    for where, path in folders.items():
        rows = embedding_rows(path)
        report.vocab[path] = rows
        if where == student_where:
            continue
        if cfg.distillation.cross_tokenizer == "on" or not same_tokenizer_files(student, path):
            try:
                other = _vocab(path, cfg.models.trust_remote_code)
            except Exception as exc:
                problems.append(f"{where}: cannot load the tokenizer from {path!r}: {exc}")
                continue
            if other != ref_vocab or cfg.distillation.cross_tokenizer == "on":
                check_cross_pair(cfg, where, student, path, problems, report.notes)
                continue
        student_rows = report.vocab[student]
        if rows != student_rows:
            report.notes.append(
                f"{where}: same tokenizer ({len(ref_vocab)} tokens); embedding rows differ ({rows} teacher vs "
                f"{student_rows} student): distributions are compared on the first "
                f"{min(rows, student_rows)} rows"
            )


def _check_lora(cfg: Config, problems: list[str], report: PreflightReport):
    """Targets against the student's module names, read from its safetensors header (no model is built)."""
    lora, student = cfg.lora, cfg.models.student
    try:
        shapes = parameter_shapes(student)
    except (OSError, ValueError) as exc:
        problems.append(f"$.models.student: cannot read the safetensors header in {student!r}: {exc}")
        return
    if shapes is None:
        return  # no safetensors weights: _model_folder has said so
    largest = max((max(shape) for shape in shapes.values() if len(shape) == 2), default=0)
    if largest and lora.r > largest and not lora.init_from:
        problems.append(
            f"$.lora.r: {lora.r} is larger than every dimension of the student's weights (largest {largest}); "
            "a LoRA rank is at most min(in, out) of the layer it adapts"
        )
    linear_names, every = module_names(shapes, model_config(student))
    linear = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    report.linear_modules = linear
    targets = lora.target_modules
    if targets == "all-linear":
        report.lora_targets = [n for n in linear if n != "lm_head"]
    else:
        missing = [t for t in targets if not any(matches(n, t) for n in linear_names)]
        for t in missing:
            kind = "is not a linear layer" if any(matches(n, t) for n in every) else "does not exist"
            problems.append(
                f"$.lora.target_modules: {t!r} {kind} in {cfg.models.student!r}; its linear modules are: "
                f"{', '.join(linear)}"
            )
        report.lora_targets = list(targets)
    for name in lora.modules_to_save or []:
        if not any(matches(n, name) for n in every):
            problems.append(f"$.lora.modules_to_save: {name!r} does not exist in {cfg.models.student!r}")
    if lora.init_from:
        problems.extend(f"$.lora.init_from: {p}" for p in adapter_folder_problems(lora.init_from))


def _check_data(cfg: Config, problems: list[str], report: PreflightReport, computing_stores: bool = False):
    from easydistill.data.records import load_prompts, load_records, with_system_prompt
    from easydistill.data.template_check import check_template

    template = cfg.dataset.template
    if template and not Path(template).is_file():
        problems.append(f"$.dataset.template: no such file {template!r}")
        template = None
    answering = cfg.job_type in ("kd_white_box", "kd_black_box_local") and bool(cfg.dataset.instruction_path)
    for key in ("labeled_path", "eval_path", "instruction_path"):
        path = getattr(cfg.dataset, key)
        if not path:
            continue
        if not Path(path).is_file():
            if key == "labeled_path" and answering:
                continue  # the teacher writes it from instruction_path before training
            api = " (kd_black_box_api trains on existing answers: easydistill calls no API)"
            problems.append(
                f"$.dataset.{key}: no such file {path!r}" + (api if cfg.job_type.endswith("api") else "")
            )
            continue
        try:
            if key == "instruction_path":  # as the teacher will answer them
                system = cfg.inference.system_prompt if writes_answers(cfg) else None
                records = with_system_prompt(load_prompts(path), system)
            else:
                records = load_records(path)
            if template:  # on the real records now, rather than after the teacher has answered them
                preview = check_template(records, template, path)
                report.template_preview = report.template_preview or preview
        except UserError as exc:
            problems.append(f"$.dataset.{key}: {exc}")
    _check_logits(cfg, problems, computing_stores)


def _check_logits(cfg: Config, problems: list[str], computing_stores: bool):
    """Stored teacher logits: there (a complete store or a v1 file), or computable by this job (kd_white_box,
    or kd.infer: `computing_stores`)."""
    cached = [t for t in cfg.teachers if t.kind == "cached"]
    if not cached:
        return
    from easydistill.store.topk import COMPUTE_HINT, is_complete, partial_path, store_location  # numpy

    trains_from_files = cfg.job_type.endswith(("train_only", "multi"))
    for teacher in cached:
        where = "$.dataset.logits_path" if len(cfg.teachers) == 1 else f"teacher {teacher.name!r}"
        given = Path(teacher.logits_path)
        if cfg.dataset.logits_format == "easydistill_v1" and given.is_dir():
            problems.append(
                f"{where}: {str(given)!r} is a folder, but dataset.logits_format says a v1 JSONL file"
            )
            continue
        if cfg.dataset.logits_format == "store" and given.is_file():
            problems.append(
                f"{where}: {str(given)!r} is a file, but dataset.logits_format says a store folder"
            )
            continue
        store, v1_file = store_location(cfg, teacher)
        if is_complete(store) or (v1_file is not None and v1_file.is_file()):
            continue
        if v1_file is not None:
            problems.append(f"{where}: no such EasyDistill v1 logits file {str(v1_file)!r}")
            continue
        if store.exists() and (not store.is_dir() or any(store.iterdir())):
            problems.append(
                f"{where}: {str(store)!r} exists but is not a teacher-logits store (no index.json)"
            )
            continue
        state = (
            "an unfinished store (kd.infer resumes it)"
            if partial_path(store).exists()
            else "no stored teacher logits"
            + (f" (no v1 logits file {str(given)!r} either)" if store != given else "")
        )
        if trains_from_files and not computing_stores:
            problems.append(
                f"{where}: {state} at {str(store)!r} ({cfg.job_type} trains from existing files; use "
                f"kd_white_box, or {COMPUTE_HINT})"
            )
        elif (cfg.job_type == "kd_white_box" or computing_stores) and not (
            teacher.path and (Path(teacher.path) / "config.json").is_file()
        ):
            folder = f"{teacher.path!r} is not a model folder" if teacher.path else "no teacher model folder"
            problems.append(
                f"{where}: {state} at {str(store)!r}, and {folder} to compute them from (models.teacher)"
            )


def _check_positions(cfg: Config, folders: dict[str, str], problems: list[str]):
    """The sequence limit must fit every model that reads whole sequences (learned position tables end there)."""
    for path in dict.fromkeys(folders.values()):
        config = model_config(path)
        positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings"
        )
        if isinstance(positions, int) and cfg.max_length > positions:
            problems.append(
                f"$.distillation.max_seq_length: {cfg.max_length} tokens exceed the {positions} positions of "
                f"{path!r} (max_position_embeddings in its config.json); lower distillation.max_seq_length "
                "(or training.max_length, which sets it in v1 files)"
            )


def preflight(
    cfg: Config, *, check_output_dir: bool = True, computing_stores: bool = False
) -> PreflightReport:
    """Every file-level problem at once, as a ConfigError; a report of what was found otherwise.

    computing_stores: the caller (kd.infer) computes missing teacher-logit stores, so they may be absent."""
    problems: list[str] = []
    report = PreflightReport()
    folders: dict[str, str] = {}
    if _model_folder(cfg.models.student, "$.models.student", problems):
        folders["$.models.student"] = cfg.models.student
    teacher = cfg.models.teacher
    for i, spec in enumerate(cfg.teachers):
        if spec.path is None:
            continue
        where = "$.models.teacher" if isinstance(teacher, str) else f"$.models.teacher[{i}]"
        if spec.kind == "cached" and not os.path.isdir(spec.path):
            continue  # v1 keeps the teacher's path beside its logits; the folder may be gone
        if _model_folder(spec.path, where, problems, weights=spec.kind != "cached"):
            folders[where] = spec.path
    if "$.models.student" in folders:
        _compare_tokenizers(cfg, folders, problems, report)
        if cfg.lora.enable:
            _check_lora(cfg, problems, report)
    _check_data(cfg, problems, report, computing_stores)
    check_existing_answers(cfg, problems, report.notes)
    _check_positions(cfg, folders, problems)
    if check_output_dir:
        problems += output_dir_problems(cfg)
    if problems:
        raise ConfigError(problems, cfg.source)
    return report
