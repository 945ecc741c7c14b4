"""The run report: evaluations before, during and after a tiny run, and the files it writes."""

from __future__ import annotations

import json

import pytest
from kd_helpers import kd_config, train, write_records

from easydistill.evaluation.report import REPORT_FILES, curves, markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-data")
    return write_records(root / "train.jsonl", "add", n=16, seed=1), write_records(
        root / "held.jsonl", "add", n=6, seed=5
    )


def test_a_run_writes_a_readable_report(tiny_pair, data, tmp_path):
    train_path, held = data
    raw = kd_config(
        tiny_pair,
        train_path,
        tmp_path / "out",
        dataset={"eval_path": str(held)},
        training={"max_steps": 3, "eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4},
        lora={"enable": False},
    )
    metrics = train(raw)
    out = tmp_path / "out"
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "report.json").read_text())
    labels = [(e["label"], e["step"]) for e in report["evaluations"]]
    # before, at the step-2 evaluation, and after (the final Trainer evaluation completed with exact match)
    assert labels == [("before training", 0), ("step 2", 2), ("after training", 3)]
    before, after = report["evaluations"][0], report["evaluations"][-1]
    assert before["exact_match"] is not None and after["exact_match"] is not None
    assert report["evaluations"][1]["exact_match"] is None  # no generation in between
    assert set(before["vs"]) == {"teacher"} and before["vs"]["teacher"]["kl"] > 0
    assert report["teacher_figures"]["teacher"]["kind"] == "online"
    series = report["curves"]
    assert [s for s, _ in series["heldout_kl/teacher"]] == [0, 2, 3]
    assert len(series["ce_loss"]) == 3 and len(series["kd_loss"]) == 3  # logging_steps 1
    assert metrics["heldout_kl/teacher"] == after["vs"]["teacher"]["kl"]
    text = (out / "report.md").read_text()
    assert "| before training | 0 |" in text and "![loss curves](loss_curves.png)" in text


def test_report_off_or_without_eval_split_writes_nothing(tiny_pair, data, tmp_path):
    train_path, held = data
    raw = kd_config(
        tiny_pair,
        train_path,
        tmp_path / "off",
        dataset={"eval_path": str(held)},
        evaluation={"report": False},
        lora={"enable": False},
    )
    train(raw)
    raw = kd_config(tiny_pair, train_path, tmp_path / "none", lora={"enable": False})
    train(raw)
    for folder in ("off", "none"):
        assert not any((tmp_path / folder / name).exists() for name in REPORT_FILES)


def test_curves_and_markdown_from_constructed_history():
    history = [
        {"step": 1, "loss": 2.0, "ce_loss": 3.0, "kd_loss": 1.0},
        {"step": 2, "eval_loss": 1.5},
    ]
    evaluations = [
        {
            "label": "before training",
            "step": 0,
            "ce": 3.2,
            "perplexity": 24.5,
            "accuracy": 0.1,
            "exact_match": 0.0,
            "vs": {"t": {"kl": 2.0, "jsd": 0.5, "top1_agreement": 0.2}},
        },
    ]
    got = curves(history, evaluations)
    assert got == {
        "loss": [[1, 2.0]],
        "ce_loss": [[1, 3.0]],
        "kd_loss": [[1, 1.0]],
        "eval_loss": [[2, 1.5]],
        "heldout_kl/t": [[0, 2.0]],
        "heldout_ce": [[0, 3.2]],
    }
    text = markdown(
        {
            "output_dir": "o",
            "config": "c.json",
            "job_type": "kd_white_box",
            "student": "s",
            "objective": {"kd_ratio": 0.5, "kind": "forward_kld"},
            "evaluations": evaluations,
            "teacher_figures": {
                "t": {"kind": "online", "ce": 1.0, "perplexity": 2.718, "accuracy": 0.5, "exact_match": 1.0}
            },
            "plot": None,
            "plot_note": "nothing was logged",
        }
    )
    assert "| before training | 0 | 3.2 | 24.5 | 0.1 | 0 | 2 | 0.5 | 0.2 |" in text
    assert "| t | online | 1 | 2.718 | 0.5 | 1 |" in text
    assert "(no plot: nothing was logged)" in text
