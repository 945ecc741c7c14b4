"""Teacher-written answers for prompt-only data: the first step of v1's kd_white_box and kd_black_box_local.

    python -m easydistill.kd.infer --config configs/kd_black_box_local.json

The teacher answers every prompt of `dataset.instruction_path` (rendered with the training template, batched
`generate` with the KV cache and left padding; greedy when `inference.temperature` is 0, else sampled with
temperature / top_p from `inference.seed`). The records go to `dataset.labeled_path`, or to
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


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    return sorted(ids)


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 42,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """One answer per rendered prompt, in order; decoded without special tokens, up to the first stop token.

    Prompts are batched by length (less padding), left-padded so that every row continues from its last
    column; `generate` keeps the KV cache. Greedy at temperature 0; otherwise sampled, seeded once.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=_stop_ids(model, tokenizer),
        use_cache=True,
        do_sample=temperature > 0,
        **sampling,
    )
    set_seed(seed)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc="teacher answers", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for row, i in enumerate(chunk):
                    input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    attention[row, width - len(encoded[i]) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                )
                for row, i in enumerate(chunk):
                    answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return answers


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
    answers = generate_answers(
        model,
        tokenizer,
        texts,
        max_new_tokens=inference.max_new_tokens,
        temperature=inference.temperature,
        top_p=inference.top_p,
        seed=inference.seed,
        batch_size=inference.batch_size,
    )
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    chat = any([m["role"] for m in p["messages"]] not in (["user"], ["system", "user"]) for p in prompts)
    write_records(target, [_answer_record(p, a, chat) for p, a in zip(prompts, answers)])
    return target
