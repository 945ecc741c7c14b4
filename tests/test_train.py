"""Invariants of the KD loop on tiny models: self-teacher, frozen teachers, accumulation, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kd_helpers import (
    kd_config,
    load_adapter_weights,
    max_abs_diff,
    prepare,
    train,
    trainable_state,
    write_records,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=24)


def sgd(**extra) -> dict:
    """Plain SGD without clipping: the update is -lr * grad, so equal updates mean equal gradients."""
    return {
        "optim": "sgd",
        "learning_rate": 1.0,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        **extra,
    }


def first_batch(run):
    return next(iter(run.trainer.get_train_dataloader()))


def test_self_teacher_kd_is_exactly_zero_at_first_step(tiny_pair, data, tmp_path):
    raw = kd_config(tiny_pair, data, tmp_path / "out", models={"teacher": "self"}, training={"max_steps": 1})
    metrics = train(raw)
    history = json.loads((tmp_path / "out/trainer_state.json").read_text())["log_history"]
    assert history[0]["kd_loss"] == 0.0
    assert history[0]["ce_loss"] > 0
    assert metrics["train_loss"] > 0


def test_self_teacher_stays_the_base_model(tiny_pair, data, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        models={"teacher": "self"},
        training={"max_steps": 4},
        lora={"dropout": 0.1},
    )
    run = prepare(raw)
    run.trainer.train()
    model, teacher = run.trainer.model, run.trainer.teachers[0]
    batch = first_batch(run)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.train()
    everywhere = torch.ones_like(inputs["input_ids"][:, 1:], dtype=torch.bool)
    teacher_logits = teacher.rows(inputs, everywhere).logits
    assert all(m.training for m in model.modules()), "the self-teacher must restore training mode"
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        model.eval()
        student_logits = model(**inputs).logits
    torch.testing.assert_close(teacher_logits, base_logits[:, :-1][everywhere], rtol=0, atol=1e-6)
    assert (student_logits - base_logits).abs().max() > 1e-4, "the adapters should have moved the student"


def test_online_teacher_is_frozen_and_outside_the_optimizer(tiny_pair, data, tmp_path):
    run = prepare(
        kd_config(tiny_pair, data, tmp_path / "out", lora={"enable": False}, training={"max_steps": 3})
    )
    teacher = run.trainer.teachers[0].model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = trainable_state(run.trainer.model)
    run.trainer.train()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in run.trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint({id(p) for p in teacher.parameters()})
    assert max_abs_diff(student_before, trainable_state(run.trainer.model)) > 0


def _one_step_update(tiny_pair, data, out, batch, accumulation, **training):
    raw = kd_config(
        tiny_pair,
        data,
        out,
        training=sgd(
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **training,
        ),
    )
    run = prepare(raw)
    before = trainable_state(run.trainer.model)
    run.trainer.train()
    after = trainable_state(run.trainer.model)
    return {k: after[k] - before[k] for k in before}, run


def test_accumulation_equivalence(tiny_pair, data, tmp_path):
    """batch 4 x accumulation 1 gives the same update as batch 1 x accumulation 4."""
    big, _ = _one_step_update(tiny_pair, data, tmp_path / "a", batch=4, accumulation=1)
    small, run = _one_step_update(tiny_pair, data, tmp_path / "b", batch=1, accumulation=4)
    # The micro-batches must carry different token counts, or a mean of per-batch means would pass too.
    loader = run.trainer.get_train_dataloader()
    counts = {int((b["labels"][:, 1:] != -100).sum()) for _, b in zip(range(4), loader)}
    assert len(counts) > 1
    assert max(float(v.abs().max()) for v in big.values()) > 1e-3
    assert max_abs_diff(big, small) < 1e-5


def test_lora_gradients_are_finite_and_nonzero_with_checkpointing(tiny_pair, data, tmp_path):
    grads = {}
    for checkpointing in (False, True):
        raw = kd_config(
            tiny_pair,
            data,
            tmp_path / f"gc{checkpointing}",
            training={"gradient_checkpointing": checkpointing},
        )
        run = prepare(raw)
        model = run.trainer.model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        batch = first_batch(run)
        run.trainer.compute_loss(model, batch).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        lora_b = [g for n, g in grads[checkpointing].items() if "lora_B" in n]
        assert lora_b and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in lora_b)
        assert all(torch.isfinite(g).all() for g in grads[checkpointing].values())
    assert max_abs_diff(grads[False], grads[True]) < 1e-6


def test_resume_equals_straight_run(tiny_pair, data, tmp_path, capsys):
    common = {"lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": 2}
    straight = kd_config(
        tiny_pair, data, tmp_path / "straight", training={"max_steps": 4, **common}, lora={"dropout": 0.1}
    )
    train(straight)
    first = kd_config(
        tiny_pair, data, tmp_path / "resumed", training={"max_steps": 2, **common}, lora={"dropout": 0.1}
    )
    train(first)
    second = kd_config(
        tiny_pair,
        data,
        tmp_path / "resumed",
        lora={"dropout": 0.1},
        training={"max_steps": 4, "resume_from_checkpoint": str(tmp_path / "resumed/checkpoint-2"), **common},
    )
    capsys.readouterr()
    train(second)
    assert f"resume: from {tmp_path / 'resumed/checkpoint-2'} (step 2 of 4)" in capsys.readouterr().out
    a = load_adapter_weights(tmp_path / "straight")
    b = load_adapter_weights(tmp_path / "resumed")
    assert max_abs_diff(a, b) < 1e-6
    log = json.loads((tmp_path / "resumed/trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_equals_adapter_model(tiny_pair, data, tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.tiny_models import build_model

    teacher, student = tiny_pair
    if tied:
        student = build_model(
            tmp_path / "tied",
            tokenizer=AutoTokenizer.from_pretrained(student),
            tie_word_embeddings=True,
            seed=3,
        )
    raw = kd_config(
        (teacher, student),
        data,
        tmp_path / "out",
        models={"student": str(student)},
        training={"max_steps": 3},
        lora={"save_merged_model": True},
    )
    metrics = train(raw)
    assert metrics["merged_max_logit_diff"] < 1e-4
    merged_dir = tmp_path / "out/merged_model"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config.tie_word_embeddings == tied
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(student), tmp_path / "out"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(["12+7=19", "reverse: abc"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**ids).logits, adapter(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(student)(**ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-4  # the merge carried the trained adapter


def test_outputs_of_a_run(tiny_pair, data, tmp_path):
    out = tmp_path / "out"
    train(kd_config(tiny_pair, data, out, training={"max_steps": 2}))
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "easydistill_config.json",
        "metrics.json",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "easydistill_config.json").read_text())
    assert resolved["distillation"]["temperature"] == 1.0  # defaults filled
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    for key in ("loss", "ce_loss", "kd_loss", "learning_rate", "tokens_per_second"):
        assert key in log[0], key
    # total = (1 - r) CE + r KD, on the same tokens
    entry = log[0]
    assert entry["loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"], rel=1e-3)
