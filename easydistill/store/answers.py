"""Teacher-written answers for prompt-only data: the first step of v1's kd_white_box and kd_black_box_local.

    python -m easydistill.kd.infer --config configs/kd_black_box_local.json

The teacher answers every prompt of `dataset.instruction_path` (rendered with the training template, or its own
tokenizer's chat template, through the one generation helper, train/generation.py: batched, left-padded, KV
cache, the model's stop ids; greedy when `inference.temperature` is 0 or unset, else sampled with temperature /
top_p from `inference.seed`). The records go to `dataset.labeled_path`, or to `<output_dir>/teacher_answers.json`
when the config names none: `{"id", "instruction", "output"}` (plus `"system"`) for single-turn prompts,
`{"id", "messages"}` when any prompt is a multi-turn chat. Answers are kept a chunk at a time, so an interrupted
run resumes; the file appears only complete, with a key file saying what made it (store/answer_files.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from easydistill.store.answer_files import (  # noqa: F401  (the names callers import from here)
    ANSWERING_JOBS,
    DEFAULT_ANSWERS,
    AnswerChunks,
    answering_teacher,
    answers_key,
    answers_path,
    write_records,
)
from easydistill.train.generation import answer_sampling, generate_texts

ANSWER_CHUNK_BATCHES = 8  # batches of prompts between two writes of the answers so far


def _answer_record(prompt: dict, answer: str, chat: bool) -> dict:
    messages = prompt["messages"]
    if chat:
        return {"id": prompt["id"], "messages": [*messages, {"role": "assistant", "content": answer}]}
    record = {"id": prompt["id"], "instruction": messages[-1]["content"], "output": answer}
    if messages[0]["role"] == "system":
        record["system"] = messages[0]["content"]
    return record


def write_teacher_answers(cfg, *, log=print) -> Path:
    """Generate the answers the config asks for and write them; returns the records file.

    Written a chunk at a time (resumed after an interruption), in the order of prompt length so that batches
    pad little; the records file keeps the prompts' order."""
    from tqdm.auto import tqdm

    from easydistill.data import load_prompts, render_prompt
    from easydistill.data.records import with_system_prompt
    from easydistill.models import load_frozen_teacher, load_tokenizer

    target = answers_path(cfg)
    prompts = with_system_prompt(load_prompts(cfg.dataset.instruction_path), cfg.inference.system_prompt)
    teacher = answering_teacher(cfg)
    tokenizer = load_tokenizer(teacher, cfg.models.trust_remote_code)  # the teacher reads and writes the text
    texts = [render_prompt(p, tokenizer, template_path=cfg.dataset.template) for p in prompts]
    chunks = AnswerChunks(target, answers_key(cfg), log=log)
    todo = sorted((i for i, p in enumerate(prompts) if not chunks.done(p["id"])), key=lambda i: len(texts[i]))
    log(
        f"teacher answers: {teacher} answers {len(todo)} of {len(prompts)} prompts of "
        f"{cfg.dataset.instruction_path} -> {target}"
    )
    if todo:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_frozen_teacher(teacher, cfg, device)
        inference = cfg.inference
        size = inference.batch_size * ANSWER_CHUNK_BATCHES
        with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher answers") as bar:
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                answers = generate_texts(
                    model,
                    tokenizer,
                    [texts[i] for i in chunk],
                    answer_sampling(cfg),
                    batch_size=inference.batch_size,
                    seed=inference.seed + chunks.next_chunk,
                )
                chunks.add([(prompts[i]["id"], a) for i, a in zip(chunk, answers)])
                bar.update(len(chunk))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    chat = any([m["role"] for m in p["messages"]] not in (["user"], ["system", "user"]) for p in prompts)
    return chunks.finish([_answer_record(p, chunks.answers[p["id"]], chat) for p in prompts])
