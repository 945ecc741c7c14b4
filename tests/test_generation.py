"""easydistill.train.generation, the one generate helper: left padding changes nothing, stop ids stop, padding
rows of the embedding matrix are never picked, seeds repeat, and which temperature each caller samples at."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from easydistill.config import load_config
from easydistill.train.generation import (
    Sampling,
    answer_sampling,
    continue_rows,
    generate_texts,
    on_policy_sampling,
    pad_id,
    stop_ids,
)

PROMPTS = [
    "<|im_start|>user\nsort: 5183<|im_end|>\n<|im_start|>assistant\n",
    "12+7=",
    "reverse: abcdefgh abc",
    "a",
]


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop) -> str:
    """One prompt, no padding, no cache: the whole sequence again at every step, argmax over real tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            token = int(logits[0, -1, : len(tokenizer)].argmax())
            if token in stop:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_batched_equals_one_by_one_without_cache(student, tokenizer):
    stop = set(stop_ids(student, tokenizer))
    expected = [reference_greedy(student, tokenizer, p, 6, stop) for p in PROMPTS]
    assert generate_texts(student, tokenizer, PROMPTS, Sampling(6), batch_size=8) == expected  # one batch
    assert generate_texts(student, tokenizer, PROMPTS, Sampling(6), batch_size=3) == expected  # 3, then 1


def test_a_row_stops_at_any_stop_id_of_the_generation_config(student, tokenizer):
    # A random model rarely says eos: make a token it does produce a stop id.
    free = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    continuations = []
    for ids in free:
        new = []
        with torch.no_grad():
            for _ in range(6):
                new.append(int(student(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        continuations.append(new)
    stop_token = next(row[k] for row in continuations for k in range(1, 6) if row[k] not in row[:k])
    saved = student.generation_config.eos_token_id
    student.generation_config.eos_token_id = [stop_token]
    try:
        assert stop_token in stop_ids(student, tokenizer)
        expected = [
            reference_greedy(student, tokenizer, p, 6, {tokenizer.eos_token_id, stop_token}) for p in PROMPTS
        ]
        got = generate_texts(student, tokenizer, PROMPTS, Sampling(6))
    finally:
        student.generation_config.eos_token_id = saved
    assert got == expected
    assert any(len(tokenizer(g, add_special_tokens=False)["input_ids"]) < 6 for g in got)  # some row stopped


def test_sampling_is_seeded_and_never_picks_a_padding_row(tiny_pair, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    real = len(tokenizer)
    head = teacher.get_output_embeddings().weight
    assert head.shape[0] > real  # the tiny teacher pads its embedding rows, as Qwen does
    with torch.no_grad():  # padding rows as likely as real ones: without the cut they would be drawn
        head[real:] = head[: head.shape[0] - real]
    prompts = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    stops, pad = stop_ids(teacher, tokenizer), pad_id(tokenizer)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        new = continue_rows(
            teacher.generate, prompts, Sampling(16, temperature=1.5), pad=pad, stops=stops, vocab_size=real
        )
        draws.append(new)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert all(int(d.max()) < real for d in draws)
    assert sum(int((d != pad).sum()) for d in draws) > 30  # enough draws that a padding row would have shown


def test_seeded_texts_repeat(student, tokenizer):
    texts = [generate_texts(student, tokenizer, PROMPTS, Sampling(6, 1.0), seed=s) for s in (3, 3, 4)]
    assert texts[0] == texts[1] != texts[2]


def _config(tiny_pair, tmp_path, inference=None, **distillation) -> object:
    teacher, student = tiny_pair
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "1+1=", "output": "2"}\n')
    raw = {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": str(data)},
        "distillation": {"max_new_tokens": 7, "top_p": 0.9, **distillation},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    if inference is not None:
        raw["inference"] = inference
    return load_config(raw)


def test_sampling_temperature_is_inference_temperature_not_the_losses(tiny_pair, tmp_path):
    cfg = _config(tiny_pair, tmp_path, lmbda=0.5, temperature=2.0)
    assert on_policy_sampling(cfg) == Sampling(7, 1.0, 0.9)  # unset: the policy's own distribution
    assert answer_sampling(cfg).greedy  # unset: teacher answers are greedy
    assert any("distillation.temperature: 2 scales the loss only" in w for w in cfg.warnings)
    cfg = _config(
        tiny_pair,
        tmp_path,
        {"temperature": 0.7, "top_p": 0.5, "max_new_tokens": 3},
        lmbda=0.5,
        temperature=2.0,
    )
    assert on_policy_sampling(cfg) == Sampling(7, 0.7, 0.9)
    assert answer_sampling(cfg) == Sampling(3, 0.7, 0.5)
    assert not any("distillation.temperature" in w for w in cfg.warnings)
    assert not any(
        "temperature" in w for w in _config(tiny_pair, tmp_path, temperature=2.0).warnings
    )  # off-policy
