"""Several teachers: one loop, weights, combine modes, padded vocabularies, offload, self as a teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, load_adapter_weights, loss_spec, train, write_records

from easydistill import cli
from easydistill.kd import multi_train
from easydistill.loss import divergence as losses
from easydistill.loss.combine import combined_divergence as _combined
from easydistill.loss.rows import DenseRows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


@pytest.fixture(scope="module")
def second_teacher(tiny_pair, tmp_path_factory) -> Path:
    """Another teacher of another size and another embedding padding, same tokenizer."""
    from transformers import AutoTokenizer

    from examples.tiny_models import build_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    return build_model(
        tmp_path_factory.mktemp("teacher2") / "t2",
        tokenizer=tokenizer,
        hidden_size=80,
        num_layers=2,
        padded_vocab=len(tokenizer) + 99,
        seed=11,
    )


def history(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def teachers(*entries) -> dict:
    return {"teacher": [dict(e) for e in entries]}


def test_weights_one_zero_reproduce_the_single_teacher(tiny_pair, second_teacher, data, tmp_path):
    teacher, _ = tiny_pair
    train(kd_config(tiny_pair, data, tmp_path / "single", training={"max_steps": 3}))
    multi = kd_config(
        tiny_pair,
        data,
        tmp_path / "multi",
        training={"max_steps": 3},
        models=teachers(
            {"path": str(teacher), "weight": 1.0, "name": "a"},
            {"path": str(second_teacher), "weight": 0.0, "name": "b"},
        ),
    )
    train(multi)
    single_log, multi_log = history(tmp_path / "single"), history(tmp_path / "multi")
    assert [e["loss"] for e in single_log] == [e["loss"] for e in multi_log]
    a, b = load_adapter_weights(tmp_path / "single"), load_adapter_weights(tmp_path / "multi")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert multi_log[0]["kd_loss/b"] > 0  # the weightless teacher is still scored and logged


def test_two_copies_equal_one_teacher(tiny_pair, data, tmp_path):
    teacher, _ = tiny_pair
    train(kd_config(tiny_pair, data, tmp_path / "one", training={"max_steps": 2}))
    train(
        kd_config(
            tiny_pair,
            data,
            tmp_path / "two",
            training={"max_steps": 2},
            models={"teacher": [str(teacher), str(teacher)]},
        )
    )
    a, b = load_adapter_weights(tmp_path / "one"), load_adapter_weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-7
    assert [e["kd_loss"] for e in history(tmp_path / "one")] == pytest.approx(
        [e["kd_loss"] for e in history(tmp_path / "two")], rel=1e-6
    )


def combined_divergence(student, teachers, weights, temperatures, targets, combine="weighted_loss"):
    """loss.combine's entry point on dense teacher logits, forward KL."""
    rows = [DenseRows(t) for t in teachers]
    return _combined(student, rows, weights, temperatures, targets, loss_spec(combine=combine))


def _probs(rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_mixture_and_weighted_loss_follow_the_maths():
    """Two opposite teachers: the mixture is uniform, so a uniform student has KL(mixture||q) = 0 while the
    weighted loss is the mean of two positive KLs."""
    p1, p2 = _probs([[0.7, 0.1, 0.1, 0.1]]), _probs([[0.1, 0.1, 0.1, 0.7]])
    p1, p2 = p1[0], p2[0]
    t1, t2 = p1.log().unsqueeze(0), p2.log().unsqueeze(0)
    student = torch.log(torch.tensor([[0.4, 0.1, 0.1, 0.4]], dtype=torch.float64)).requires_grad_()
    targets = torch.tensor([0])
    kl = lambda p, q: float((p * (p / q).log()).sum())  # noqa: E731
    q = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)
    weighted, own = combined_divergence(
        student, [t1, t2], [0.5, 0.5], [1.0, 1.0], targets, combine="weighted_loss"
    )
    mixture, _ = combined_divergence(student, [t1, t2], [0.5, 0.5], [1.0, 1.0], targets, combine="mixture")
    summed, _ = combined_divergence(student, [t1, t2], [0.5, 0.5], [1.0, 1.0], targets, combine="sum")
    assert float(weighted) == pytest.approx(0.5 * kl(p1, q) + 0.5 * kl(p2, q), rel=1e-6)
    assert float(mixture) == pytest.approx(kl(0.5 * p1 + 0.5 * p2, q), abs=1e-6)
    assert float(mixture) == pytest.approx(0.0, abs=1e-6) and float(weighted) > 0.1
    assert float(summed) == pytest.approx(kl(p1, q) + kl(p2, q), rel=1e-6)
    assert [float(o) for o in own] == pytest.approx([kl(p1, q), kl(p2, q)], rel=1e-6)
    mixture.backward()
    assert student.grad.abs().max() < 1e-6  # at the optimum of the mixture objective


def test_confidence_weights_follow_the_gold_token():
    p1 = torch.tensor([[0.9, 0.05, 0.05]], dtype=torch.float64)  # right about the gold token 0
    p2 = torch.tensor([[0.1, 0.45, 0.45]], dtype=torch.float64)
    student = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    kd, own = combined_divergence(
        student, [p1.log(), p2.log()], [0.5, 0.5], [1.0, 1.0], torch.tensor([0]), combine="confidence"
    )
    expected = (0.9 * float(own[0]) + 0.1 * float(own[1])) / 1.0
    assert float(kd) == pytest.approx(expected, rel=1e-6)
    # static weights still count: w = (0.1, 0.9) gives 0.09 : 0.09, an even split
    kd, own = combined_divergence(
        student, [p1.log(), p2.log()], [0.1, 0.9], [1.0, 1.0], torch.tensor([0]), combine="confidence"
    )
    assert float(kd) == pytest.approx(0.5 * float(own[0]) + 0.5 * float(own[1]), rel=1e-6)


def test_padded_vocabularies_are_cut_to_the_shared_width():
    torch.manual_seed(0)
    student = torch.randn(5, 10)
    teacher = torch.randn(5, 10)
    padded = torch.cat([teacher, torch.full((5, 7), 30.0)], dim=-1)  # junk padding rows
    targets = torch.zeros(5, dtype=torch.long)
    for combine in ("weighted_loss", "mixture", "sum", "confidence"):
        a, _ = combined_divergence(
            student, [teacher, teacher], [0.5, 0.5], [1.0, 1.0], targets, combine=combine
        )
        b, _ = combined_divergence(
            student, [padded, teacher], [0.5, 0.5], [1.0, 1.0], targets, combine=combine
        )
        torch.testing.assert_close(a, b)
    reference = losses.divergence(student, teacher, "forward_kld", reduction="sum")
    torch.testing.assert_close(combined_divergence(student, [padded], [1.0], [1.0], targets)[0], reference)


@pytest.mark.parametrize("combine", ["weighted_loss", "mixture", "sum", "confidence"])
def test_combine_modes_train_with_teachers_of_different_sizes(
    tiny_pair, second_teacher, data, tmp_path, combine
):
    teacher, _ = tiny_pair
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        training={"max_steps": 2},
        distillation={"combine": combine},
        models=teachers(
            {"path": str(teacher), "weight": 2, "name": "big"},
            {"path": str(second_teacher), "weight": 1, "name": "small"},
        ),
    )
    train(raw)
    log = history(tmp_path / "out")
    assert all(math.isfinite(e["kd_loss"]) and e["kd_loss/big"] > 0 and e["kd_loss/small"] > 0 for e in log)
    if combine == "weighted_loss":
        for e in log:
            assert e["kd_loss"] == pytest.approx((2 * e["kd_loss/big"] + e["kd_loss/small"]) / 3, rel=1e-4)
    if combine == "sum":
        for e in log:
            assert e["kd_loss"] == pytest.approx(e["kd_loss/big"] + e["kd_loss/small"], rel=1e-4)


def test_offload_gives_the_same_run(tiny_pair, second_teacher, data, tmp_path):
    teacher, _ = tiny_pair
    pair = teachers({"path": str(teacher), "name": "a"}, {"path": str(second_teacher), "name": "b"})
    train(kd_config(tiny_pair, data, tmp_path / "plain", training={"max_steps": 2}, models=pair))
    train(
        kd_config(
            tiny_pair,
            data,
            tmp_path / "offload",
            training={"max_steps": 2},
            models={**pair, "teacher_offload": True},
        )
    )
    assert [e["loss"] for e in history(tmp_path / "plain")] == [
        e["loss"] for e in history(tmp_path / "offload")
    ]


def test_self_teacher_inside_a_list(tiny_pair, data, tmp_path):
    teacher, _ = tiny_pair
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        training={"max_steps": 1},
        models={"teacher": ["self", str(teacher)]},
    )
    train(raw)
    first = history(tmp_path / "out")[0]
    assert first["kd_loss/self"] == 0.0 and first[f"kd_loss/{teacher.name}"] > 0


def test_multi_train_entry_point_and_tokenizer_check(
    tiny_pair, second_teacher, mismatched_tokenizer_model, data, tmp_path, capsys
):
    teacher, _ = tiny_pair
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        training={"max_steps": 1},
        models={"teacher": [str(teacher), str(mismatched_tokenizer_model)]},
    )
    raw["job_type"] = "kd_white_box_train_only_multi"
    raw["distillation"]["cross_tokenizer"] = "off"  # tests/test_cross_tokenizer_training.py covers "auto"
    path = tmp_path / "multi.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as info:
        cli.run(multi_train.main, ["--config", str(path)])
    assert info.value.code == 2
    assert "$.models.teacher[1]: the teacher's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    raw["models"]["teacher"] = [str(teacher), str(second_teacher)]
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as info:
        cli.run(multi_train.main, ["--config", str(path)])
    assert info.value.code == 0
    assert "kd_loss/t2" in history(tmp_path / "out")[0]
