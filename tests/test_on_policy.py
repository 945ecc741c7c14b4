"""On-policy GKD: when generation happens, what the mask covers, schedules, determinism, self-teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, prepare, write_records

from easydistill.train.on_policy import LmbdaSchedule, completion_batch, is_on_policy, split_prompts


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


def counting(fn, calls: list):
    def wrapper(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        return fn(**kwargs)

    return wrapper


def run_counting(raw: dict) -> tuple[list, list, list[dict]]:
    run = prepare(raw)
    student_calls, teacher_calls = [], []
    model = run.trainer.model
    model.generate = counting(model.generate, student_calls)
    teacher = run.trainer.teachers[0]
    teacher.generate = counting(teacher.generate, teacher_calls)
    run.trainer.train()
    log = [e for e in run.trainer.state.log_history if "loss" in e]
    return student_calls, teacher_calls, log


def on_policy_config(tiny_pair, data, out, **distillation):
    return kd_config(
        tiny_pair,
        data,
        out,
        distillation={"max_new_tokens": 4, "temperature": 1.0, **distillation},
        training={"max_steps": 3, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    )


def test_lmbda_zero_never_generates(tiny_pair, data, tmp_path):
    student, teacher, log = run_counting(on_policy_config(tiny_pair, data, tmp_path / "o", lmbda=0.0))
    assert student == [] and teacher == []
    assert "on_policy_fraction" not in log[0]


def test_lmbda_one_always_generates(tiny_pair, data, tmp_path):
    student, teacher, log = run_counting(on_policy_config(tiny_pair, data, tmp_path / "o", lmbda=1.0))
    assert len(student) == 3 * 2 and teacher == []  # every micro-batch of every step
    assert all(e["on_policy_fraction"] == 1.0 and e["generated_tokens"] > 0 for e in log)
    assert all(0 < e["generation_time_share"] <= 1 for e in log)
    assert all(e["lmbda"] == 1.0 for e in log)


def test_seq_kd_samples_from_the_teacher(tiny_pair, data, tmp_path):
    student, teacher, log = run_counting(on_policy_config(tiny_pair, data, tmp_path / "o", seq_kd=True))
    assert student == [] and len(teacher) == 3 * 2
    assert all(e["on_policy_fraction"] == 0.0 and e["generated_tokens"] > 0 for e in log)


def test_seeded_runs_repeat_exactly(tiny_pair, data, tmp_path):
    logs = []
    for name in ("a", "b"):
        _, _, log = run_counting(on_policy_config(tiny_pair, data, tmp_path / name, lmbda=0.5))
        logs.append([(e["loss"], e["on_policy_fraction"], e["generated_tokens"]) for e in log])
    assert logs[0] == logs[1]


def test_mask_covers_exactly_the_generated_tokens():
    eos, pad = 2, 0
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    generated = torch.tensor([[11, 12, eos, pad, pad], [13, 14, 15, 16, 17]])  # row 1 never stops
    batch = completion_batch(prompts, generated, {eos}, pad)
    assert batch["labels"].tolist() == [[-100, -100, -100, 11, 12, eos], [-100, 13, 14, 15, 16, 17]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 11, 12, eos], [8, 13, 14, 15, 16, 17]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6]
    shorter = completion_batch(prompts, torch.tensor([[eos, 9, 9], [13, eos, 9]]), {eos}, pad)
    assert shorter["labels"].tolist() == [[-100, -100, -100, eos], [-100, 13, eos, -100]]
    assert shorter["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_prompts_end_where_labels_start():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[-100, -100, 3, 4, -100], [-100, 6, 7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
    }
    assert [p.tolist() for p in split_prompts(batch)] == [[1, 2], [5]]


def test_schedule_values():
    linear = LmbdaSchedule(0.0, 1.0, "linear")
    cosine = LmbdaSchedule(0.2, 0.6, "cosine")
    assert [linear.value(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert cosine.value(0, 10) == pytest.approx(0.2)
    assert cosine.value(5, 10) == pytest.approx(0.4)
    assert cosine.value(10, 10) == pytest.approx(0.6)
    assert cosine.value(2, 10) == pytest.approx(0.2 + 0.4 * (1 - 0.8090169943749475) / 2)
    assert LmbdaSchedule(0.3, 0.3).value(7, 10) == 0.3


def test_schedule_is_logged(tiny_pair, data, tmp_path):
    raw = on_policy_config(tiny_pair, data, tmp_path / "o", lmbda_schedule={"start": 0.0, "end": 1.0})
    raw["training"]["max_steps"] = 4
    _, _, log = run_counting(raw)
    # logged after each step: the value the step's micro-batches used (steps 0..3 of 4)
    assert [e["lmbda"] for e in log] == [0.0, 0.25, 0.5, 0.75]


def test_decision_depends_only_on_seed_step_and_micro_batch():
    draws = [[is_on_policy(0.5, 42, step, micro) for micro in range(4)] for step in range(50)]
    again = [[is_on_policy(0.5, 42, step, micro) for micro in range(4)] for step in range(50)]
    assert draws == again
    share = sum(map(sum, draws)) / 200
    assert 0.35 < share < 0.65
    assert [is_on_policy(0.0, 1, s, 0) for s in range(20)] == [False] * 20


def test_self_teacher_on_policy_end_to_end(tiny_pair, data, tmp_path):
    """Off-policy CE batches move the fresh adapters first; later on-policy batches then carry a real KD
    term: the student samples with its adapters on, the teacher scores with them off."""
    raw = on_policy_config(
        tiny_pair, data, tmp_path / "o", lmbda_schedule={"start": 0.0, "end": 1.0}, distillation_type="jsd"
    )
    raw["models"]["teacher"] = "self"
    raw["training"].update(max_steps=6, learning_rate=5e-3)
    student, _, log = run_counting(raw)
    assert len(student) > 0
    assert log[0]["kd_loss"] == 0.0 and log[0]["on_policy_fraction"] == 0.0
    assert any(e["on_policy_fraction"] > 0 and e["kd_loss"] > 0 for e in log[1:])
