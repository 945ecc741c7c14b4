"""Teacher-written answers for prompt-only data: the first step of v1's kd_white_box and kd_black_box_local.

    python -m easydistill.kd.infer --config configs/kd_black_box_local.json

The teacher answers every prompt of `dataset.instruction_path` (rendered with the training template, through the
one generation helper, train/generation.py: batched, left-padded, KV cache, the model's stop ids; greedy when
`inference.temperature` is 0 or unset, else sampled with temperature / top_p from `inference.seed`). The records go to `dataset.labeled_path`, or to
`<output_dir>/teacher_answers.json` when the config names none: `{"id", "instruction", "output"}` (plus
`"system"`) for single-turn prompts, `{"id", "messages"}` when any prompt is a multi-turn chat. The file is
written atomically, so it exists only complete and a second run reuses it instead of generating again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from easydistill.errors import UserError
from easydistill.train.generation import answer_sampling, generate_texts

DEFAULT_ANSWERS = "teacher_answers.json"
ANSWERING_JOBS = ("kd_white_box", "kd_black_box_local")


def answers_path(cfg) -> Path:
    """Where the teacher's answers are (or will be): dataset.labeled_path, else a file in output_dir."""
    return Path(cfg.dataset.labeled_path) if cfg.dataset.labeled_path else cfg.output_dir / DEFAULT_ANSWERS


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


def _answer_record(prompt: dict, answer: str, chat: bool) -> dict:
    messages = prompt["messages"]
    if chat:
        return {"id": prompt["id"], "messages": [*messages, {"role": "assistant", "content": answer}]}
    record = {"id": prompt["id"], "instruction": messages[-1]["content"], "output": answer}
    if messages[0]["role"] == "system":
        record["system"] = messages[0]["content"]
    return record


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_teacher_answers(cfg, *, log=print) -> Path:
    """Generate the answers the config asks for and write them; returns the records file."""
    from easydistill.data import load_prompts, render_prompt
    from easydistill.models import load_frozen_teacher, load_tokenizer

    target = answers_path(cfg)
    prompts = load_prompts(cfg.dataset.instruction_path)
    system = cfg.inference.system_prompt
    if system:
        for p in prompts:
            if p["messages"][0]["role"] != "system":
                p["messages"] = [{"role": "system", "content": system}, *p["messages"]]
    tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
    texts = [render_prompt(p, tokenizer, template_path=cfg.dataset.template) for p in prompts]
    teacher = answering_teacher(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(
        f"teacher answers: {teacher} answers {len(prompts)} prompts of {cfg.dataset.instruction_path} -> {target}"
    )
    model = load_frozen_teacher(teacher, cfg, device)
    inference = cfg.inference
    answers = generate_texts(
        model,
        tokenizer,
        texts,
        answer_sampling(cfg),
        batch_size=inference.batch_size,
        seed=inference.seed,
        progress=True,
        desc="teacher answers",
    )
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    chat = any([m["role"] for m in p["messages"]] not in (["user"], ["system", "user"]) for p in prompts)
    write_records(target, [_answer_record(p, a, chat) for p, a in zip(prompts, answers)])
    return target
