"""Every shipped config runs a few steps end to end, with its model and data paths pointed at tiny ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kd_helpers import prepare, train, write_records

from examples.tiny_models import point_config_at

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((REPO / "configs").glob("*.json"))
# The quickstart config names the folders the quickstart builds; tests/test_quickstart.py runs it.
CONFIGS = [p for p in ALL_CONFIGS if p.name != "quickstart.json"]


def on_tiny_models(raw: dict, tiny_pair, data: Path, out: Path) -> dict:
    teacher, student = tiny_pair
    point_config_at(raw, teacher, student, data, out, REPO)
    raw["dataset"].setdefault("eval_ratio", 0.25)  # every config gets the run report (kd_white_box has one)
    raw["distillation"]["max_seq_length"] = 64
    raw["training"].update(
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_runs(path, tiny_pair, tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=16)
    raw = on_tiny_models(json.loads(path.read_text()), tiny_pair, data, tmp_path / "out")
    metrics = train(raw)
    assert metrics["train_loss"] > 0
    log = json.loads((tmp_path / "out/trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    if raw.get("lora", {}).get("save_merged_model"):
        assert (tmp_path / "out/merged_model/config.json").is_file()
    n_teachers = len(raw["models"]["teacher"]) if isinstance(raw["models"]["teacher"], list) else 1
    if n_teachers > 1:
        assert all(f"kd_loss/{t['name']}" in log[0] for t in raw["models"]["teacher"])
    # Exact match on the configs' kind of data (records with outputs), before and after training
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert "each eval record's output" in report["exact_match_basis"]
    assert [e["label"] for e in report["evaluations"]] == ["before training", "after training"]
    assert all(0.0 <= e["exact_match"] <= 1.0 for e in report["evaluations"])
    assert metrics["heldout_exact_match"] == report["evaluations"][-1]["exact_match"]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_takes_the_fused_path(path, tiny_pair, tmp_path, capsys):
    """The run's start line names the loss path: every shipped config, as a user copies it, is fused."""
    data = write_records(tmp_path / "train.jsonl", n=8)
    prepare(on_tiny_models(json.loads(path.read_text()), tiny_pair, data, tmp_path / "out"))
    starts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss: ")]
    assert len(starts) == 1 and starts[0].startswith("loss: fused chunked path"), starts
