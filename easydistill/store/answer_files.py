"""Teacher-written answers on disk: where they go, what made them, and progress that survives an interruption.

    <answers>.json / .jsonl      the records training reads (written atomically, once complete)
    <answers>.teacher.json       what made them: teacher folder, template, prompts file, generation settings
    <answers>.partial/           while writing: meta.json (the same key) and chunk-NNNNN.jsonl of {id, answer}

A finished file is reused only while its key matches the config: answers made by another teacher, with another
template, other prompts or other generation settings are refused before any model loads (the user decides
whether to keep them). An unfinished folder resumes when its key matches and starts again when it does not.
No torch here: validation reads keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from easydistill.errors import UserError

DEFAULT_ANSWERS = "teacher_answers.json"
ANSWERING_JOBS = ("kd_white_box", "kd_black_box_local")


def answers_path(cfg) -> Path:
    """Where the teacher's answers are (or will be): dataset.labeled_path, else a file in output_dir."""
    return Path(cfg.dataset.labeled_path) if cfg.dataset.labeled_path else cfg.output_dir / DEFAULT_ANSWERS


def writes_answers(cfg) -> bool:
    """True when this job has the teacher answer dataset.instruction_path (unless the answers exist)."""
    return cfg.job_type in ANSWERING_JOBS and bool(cfg.dataset.instruction_path)


def answering_teacher(cfg) -> str:
    """The model folder that writes the answers: the first teacher with a folder ("self": the student)."""
    teacher = cfg.models.teacher
    entries = [teacher] if isinstance(teacher, str) else list(teacher or [])
    for entry in entries:
        path = entry if isinstance(entry, str) else entry.get("path")
        if path:
            return cfg.models.student if path == "self" else path
    raise UserError(
        "$.models.teacher: writing answers for dataset.instruction_path needs a teacher model folder"
    )


def key_file(target: Path) -> Path:
    return target.with_name(target.name + ".teacher.json")


def partial_folder(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _digest(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "little") + blob)
    return h.hexdigest()[:16]


def _chat_template_text(folder: Path) -> bytes:
    """The tokenizer's chat template as its files hold it (tokenizer_config.json and/or chat_template.jinja)."""
    parts = []
    config = folder / "tokenizer_config.json"
    if config.is_file():
        parts.append(json.dumps(json.loads(config.read_text()).get("chat_template")).encode())
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        parts.append(jinja.read_bytes())
    return b"\n".join(parts)


def answers_key(cfg) -> dict:
    """What decides the answers: the teacher (folder, config, weight files), template, prompts, generation."""
    teacher = Path(answering_teacher(cfg)).resolve()
    weights = sorted((f.name, f.stat().st_size) for f in teacher.glob("*.safetensors"))
    template = cfg.dataset.template
    inference = cfg.inference
    return {
        "teacher": str(teacher),
        "teacher_files": _digest((teacher / "config.json").read_bytes(), json.dumps(weights).encode()),
        "template": str(template) if template else "the teacher tokenizer's chat template",
        "template_text": _digest(Path(template).read_bytes() if template else _chat_template_text(teacher)),
        "prompts": str(cfg.dataset.instruction_path),
        "prompts_text": _digest(Path(cfg.dataset.instruction_path).read_bytes()),
        "generation": {
            "max_new_tokens": inference.max_new_tokens,
            "temperature": inference.temperature,
            "top_p": inference.top_p,
            "seed": inference.seed,
            "system_prompt": inference.system_prompt,
        },
    }


def _differences(old: dict, new: dict) -> str:
    names = {"teacher_files": "teacher weights", "template_text": "template text", "prompts_text": "prompts"}
    changed = [names.get(k, k) for k in new if old.get(k) != new[k]]
    return ", ".join(changed) or "format"


def check_existing_answers(cfg, problems: list[str], notes: list[str]) -> None:
    """Preflight: answers to be written need a teacher folder; existing ones must match what the config asks."""
    if not writes_answers(cfg):
        return
    target = answers_path(cfg)
    where = "$.dataset.labeled_path" if cfg.dataset.labeled_path else "$.training.output_dir"
    if target.is_file() and not key_file(target).is_file():
        notes.append(
            f"{where}: {str(target)!r} exists and was not written by easydistill: training reads it as it is "
            "and the teacher writes no answers (remove it to have them written)"
        )
        return
    try:
        teacher = answering_teacher(cfg)
    except UserError as exc:
        problems.append(str(exc))
        return
    if not (Path(teacher) / "config.json").is_file():
        if any(repr(teacher) in p for p in problems):
            return  # its folder problem is already said
        problems.append(
            f"$.models.teacher: {teacher!r} is not a model folder (no config.json), and the teacher must write "
            f"the answers to {cfg.dataset.instruction_path!r} into {str(target)!r}"
        )
        return
    if target.is_file():
        try:
            old = json.loads(key_file(target).read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        key = answers_key(cfg)
        if old != key:
            problems.append(
                f"{where}: {str(target)!r} holds answers made with another {_differences(old, key)} than this "
                f"config asks for ({key_file(target).name} says what made them); remove both files to have "
                "the teacher answer again, or name another dataset.labeled_path"
            )
        else:
            notes.append(f"teacher answers: {str(target)!r} was made by this teacher and template; reused")


class AnswerChunks:
    """Answers written a chunk at a time into `<target>.partial/`, resumed when the key matches."""

    def __init__(self, target: Path, key: dict, *, log=print):
        self.target, self.key = Path(target), key
        self.partial = partial_folder(self.target)
        self.answers: dict[str, str] = {}
        meta = self.partial / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()) == key:
            for chunk in sorted(self.partial.glob("chunk-*.jsonl")):
                for line in chunk.read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    self.answers[row["id"]] = row["answer"]
            if self.answers:
                log(f"teacher answers: resuming {self.partial} ({len(self.answers)} answers kept)")
            self.next_chunk = len(list(self.partial.glob("chunk-*.jsonl")))
            return
        if self.partial.exists():
            log(f"note: {self.partial} was made with another teacher, template or settings; starting again")
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        _write_text(meta, json.dumps(key, indent=1) + "\n")
        self.next_chunk = 0

    def done(self, sample_id: str) -> bool:
        return sample_id in self.answers

    def add(self, pairs: list[tuple[str, str]]) -> None:
        """One chunk of (sample id, answer): on disk (atomically) before this returns."""
        text = "".join(json.dumps({"id": i, "answer": a}, ensure_ascii=False) + "\n" for i, a in pairs)
        _write_text(self.partial / f"chunk-{self.next_chunk:05d}.jsonl", text)
        self.next_chunk += 1
        self.answers.update(pairs)

    def finish(self, records: list[dict]) -> Path:
        """Write the records file and its key file, then drop the partial folder."""
        # The key first: a file without one would read as the user's own; a key without a file is rewritten.
        _write_text(key_file(self.target), json.dumps(self.key, indent=1) + "\n")
        write_records(self.target, records)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.target


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_records(path: Path, records: list[dict]) -> None:
    """JSON list (.json) or one record per line (.jsonl), written to a temporary file then renamed."""
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(
            f"$.dataset.labeled_path: the teacher writes .json or .jsonl files, not {path.name!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _write_text(path, text)
