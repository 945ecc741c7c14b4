"""Finite-or-stop: a non-finite loss or gradient norm never reaches the weights, the run stops (exit 3) unless
training.skip_nonfinite_steps allows skipping, and every rank decides alike."""

from __future__ import annotations

import pytest
import torch
from kd_helpers import (
    kd_config,
    max_abs_diff,
    prepare,
    train,
    train_on_two_ranks,
    trainable_state,
    write_records,
)
from transformers import TrainerCallback

from easydistill.errors import RunStopped
from easydistill.faults import NAN_ENV
from easydistill.train.checkpoints import COMPLETE, checkpoint_problem


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=24)


class Snapshots(TrainerCallback):
    """Trainable weights after every optimizer step (index 0: before the first)."""

    def __init__(self, model):
        self.model, self.states = model, [trainable_state(model)]

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(trainable_state(self.model))


def run_with_snapshots(raw):
    run = prepare(raw)
    snapshots = Snapshots(run.trainer.model)
    run.trainer.add_callback(snapshots)
    return run, snapshots


def test_nan_loss_stops_before_the_step_changes_anything(tiny_pair, data, tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "3")
    out = tmp_path / "out"
    raw = kd_config(
        tiny_pair, data, out, training={"max_steps": 5, "save_strategy": "steps", "save_steps": 2}
    )
    run, snapshots = run_with_snapshots(raw)
    with pytest.raises(RunStopped, match=r"step 3: the loss is not finite") as stopped:
        run.trainer.train()
    assert str(out / "checkpoint-2") in str(stopped.value)
    assert len(snapshots.states) == 3  # steps 1 and 2 happened, 3 did not
    assert max_abs_diff(trainable_state(run.trainer.model), snapshots.states[2]) == 0.0
    assert checkpoint_problem(out / "checkpoint-2") is None


def test_a_stopped_run_saves_nothing_as_final(tiny_pair, data, tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "2")
    out = tmp_path / "out"
    with pytest.raises(RunStopped, match="step 2"):
        train(kd_config(tiny_pair, data, out, training={"max_steps": 3}))
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / COMPLETE).exists()
    assert not (out / "metrics.json").exists()


def test_huge_learning_rate_stops_the_run(tiny_pair, data, tmp_path):
    """No hook: the numbers blow up by themselves."""
    sgd = {"optim": "sgd", "learning_rate": 1e30, "max_grad_norm": 0.0, "lr_scheduler_type": "constant"}
    out = tmp_path / "out"
    with pytest.raises(RunStopped, match="not finite"):
        train(kd_config(tiny_pair, data, out, training={"max_steps": 6, **sgd}))
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_skipped_step_leaves_weights_and_schedule_alone(tiny_pair, data, tmp_path, monkeypatch, accumulation):
    monkeypatch.setenv(NAN_ENV, "2")
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        training={
            "max_steps": 3,
            "skip_nonfinite_steps": 1,
            "per_device_train_batch_size": 4 // accumulation,
            "gradient_accumulation_steps": accumulation,
        },
    )
    run, snapshots = run_with_snapshots(raw)
    run.trainer.train()
    s = snapshots.states
    assert len(s) == 4 and run.trainer.skipped_steps == [2]
    assert max_abs_diff(s[1], s[0]) > 0 and max_abs_diff(s[3], s[2]) > 0
    assert max_abs_diff(s[2], s[1]) == 0.0  # step 2 did not update
    assert all(torch.isfinite(v).all() for v in s[3].values())
    assert run.trainer.lr_scheduler.last_epoch == 2  # the scheduler skipped it too
    assert "step" not in vars(run.trainer.optimizer)  # updates are back on


def test_skips_are_bounded(tiny_pair, data, tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "2,3")
    raw = kd_config(tiny_pair, data, tmp_path / "out", training={"max_steps": 4, "skip_nonfinite_steps": 1})
    with pytest.raises(RunStopped, match=r"step 3: .* after skipping 1 such step"):
        train(raw)


def test_nonfinite_accumulated_micro_batch_stops_the_step(tiny_pair, data, tmp_path, monkeypatch):
    """The NaN is in the first of two micro-batches; the step (both) is refused."""
    monkeypatch.setenv(NAN_ENV, "2")
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        training={"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    )
    run, snapshots = run_with_snapshots(raw)
    with pytest.raises(RunStopped, match="step 2"):
        run.trainer.train()
    assert max_abs_diff(trainable_state(run.trainer.model), snapshots.states[1]) == 0.0


def test_skip_key_is_schema_checked():
    from easydistill.config import load_config
    from easydistill.errors import ConfigError

    raw = {
        "job_type": "kd_black_box_train_only",
        "dataset": {"labeled_path": "x.jsonl"},
        "models": {"student": "s"},
        "training": {"output_dir": "o", "skip_nonfinite_steps": -1},
    }
    with pytest.raises(ConfigError, match=r"\$\.training\.skip_nonfinite_steps"):
        load_config(raw)


def test_run_stopped_exits_3(capsys):
    from easydistill.cli import run

    def main(argv):
        raise RunStopped("step 7: the loss is not finite")

    with pytest.raises(SystemExit) as exited:
        run(main, [])
    assert exited.value.code == 3
    assert "error: step 7: the loss is not finite" in capsys.readouterr().err


@pytest.mark.multiproc
def test_all_ranks_stop_when_one_rank_sees_nan(tiny_pair, data, tmp_path, monkeypatch):
    """The NaN is on rank 1 only; rank 0, whose own loss is finite, stops at the same step with exit 3 (the
    launcher then ends rank 1), instead of updating and waiting for rank 1 in the next collective."""
    monkeypatch.setenv(NAN_ENV, "2:1")
    out = tmp_path / "two"
    raw = kd_config(tiny_pair, data, out, training={"max_steps": 3, "per_device_train_batch_size": 2})
    proc = train_on_two_ranks(raw, tmp_path / "two.json")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert log.count("error: step 2: the loss is not finite on 1 micro-batch") == 1, log[-3000:]
    assert "exitcode  : 3" in log, log[-3000:]
    assert not (out / "adapter_model.safetensors").exists()
