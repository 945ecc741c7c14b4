"""Checkpoints and exports appear complete or not at all; resume takes the newest complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from kd_helpers import kd_config, load_adapter_weights, max_abs_diff, train, write_records

from easydistill.atomic import remove_stale_partials, write_text_atomic
from easydistill.errors import UserError
from easydistill.train.checkpoints import (
    COMPLETE,
    MANIFEST,
    checkpoint_problem,
    checkpoints,
    plan_resume,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=24)


def every_step(tiny_pair, data, out, **training):
    """4 steps, a checkpoint after each, at most 2 kept."""
    extra = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 2, **training}
    return kd_config(tiny_pair, data, out, training=extra, lora={"dropout": 0.1})


@pytest.fixture(scope="module")
def finished(tiny_pair, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(every_step(tiny_pair, data, out))
    return out


def test_a_run_leaves_complete_checkpoints_only(finished):
    assert [step for step, _ in checkpoints(finished)] == [3, 4]  # rotated in the real folder
    for _, folder in checkpoints(finished):
        assert checkpoint_problem(folder) is None
        files = json.loads((folder / MANIFEST).read_text())["files"]
        assert "easydistill_run.json" in files  # the run id is part of the checkpoint before it is renamed
    assert (finished / COMPLETE).is_file()
    assert [p.name for p in finished.iterdir() if p.name.startswith(".")] == []


def tear_weights(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def tear_state(folder):  # what an interrupted save by an older version (no manifest) looks like
    (folder / MANIFEST).unlink()
    (folder / "trainer_state.json").unlink()


@pytest.mark.parametrize("tear", [tear_weights, tear_state])
def test_resume_skips_a_torn_checkpoint(tiny_pair, data, finished, tmp_path, capsys, tear):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for name in ("adapter_model.safetensors", COMPLETE):  # as if killed before the final export
        (out / name).unlink()
    tear(out / "checkpoint-4")
    problem = checkpoint_problem(out / "checkpoint-4")
    assert problem
    capsys.readouterr()
    train(every_step(tiny_pair, data, out, resume_from_checkpoint=True))
    said = capsys.readouterr().out
    assert f"warning: resume: skipping and removing torn {out / 'checkpoint-4'} ({problem})" in said
    assert f"resume: from {out / 'checkpoint-3'} (step 3 of 4)" in said
    assert max_abs_diff(load_adapter_weights(out), load_adapter_weights(finished)) <= 1e-6
    assert checkpoint_problem(out / "checkpoint-4") is None


def test_an_explicit_torn_checkpoint_is_a_user_error(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    tear_weights(out / "checkpoint-4")
    with pytest.raises(
        UserError, match=r"resume_from_checkpoint: .*checkpoint-4 is not a complete checkpoint"
    ):
        plan_resume(str(out / "checkpoint-4"), out)
    with pytest.raises(UserError, match="not a folder"):
        plan_resume(str(out / "checkpoint-9"), out)
    assert plan_resume(str(out / "checkpoint-3"), out).checkpoint == str(out / "checkpoint-3")


def test_resume_without_a_checkpoint_starts_fresh(tiny_pair, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint-1.partial").mkdir()  # killed inside the first save
    train(kd_config(tiny_pair, data, out, training={"max_steps": 1, "resume_from_checkpoint": True}))
    said = capsys.readouterr().out
    assert f"resume: no complete checkpoint in {out}; starting from step 0" in said
    assert not (out / ".checkpoint-1.partial").exists()
    assert (out / COMPLETE).is_file()


def test_resuming_a_finished_run_without_checkpoints_does_nothing(tiny_pair, data, tmp_path, capsys):
    out = tmp_path / "run"
    train(kd_config(tiny_pair, data, out, training={"max_steps": 1}))
    weights = (out / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    metrics = train(
        kd_config(tiny_pair, data, out, training={"max_steps": 1, "resume_from_checkpoint": True})
    )
    assert "holds no checkpoint to continue from; nothing to do" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == weights
    assert metrics == json.loads((out / "metrics.json").read_text())


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            ".checkpoint-4.partial": True,
            ".final.partial": True,
            f".merged_model.partial-{dead_pid}": True,
            f".metrics.json.tmp-{dead_pid}": True,
            f".merged_model.partial-{alive.pid}": False,  # another merge is writing it right now
            ".hidden": False,
            "checkpoint-4": False,
            "merged_model": False,
        }
        for name in names:
            (tmp_path / name).mkdir()
        removed = {p.name for p in remove_stale_partials(tmp_path)}
    finally:
        alive.kill()
        alive.wait()
    assert removed == {name for name, stale in names.items() if stale}
    assert {p.name for p in tmp_path.iterdir()} == {name for name, stale in names.items() if not stale}


def test_atomic_text_write_replaces_whole_files(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_checkpoint_writers_add_to_the_temporary_folder(tiny_pair, data, tmp_path):
    from kd_helpers import prepare

    out = tmp_path / "run"
    run = prepare(every_step(tiny_pair, data, out, max_steps=1))
    seen = []

    def stamp(folder):
        seen.append(folder.parent.name)
        (folder / "stamp.json").write_text("{}")

    run.trainer.checkpoint_writers.append(stamp)
    run.trainer.train()
    assert seen == [".checkpoint-1.partial"]
    assert "stamp.json" in json.loads((out / "checkpoint-1" / MANIFEST).read_text())["files"]
