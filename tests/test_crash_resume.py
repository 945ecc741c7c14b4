"""SIGKILL a real `python -m easydistill.kd.train` at named points, resume it as docs/reliability.md says
(the same config with `training.resume_from_checkpoint: true`), and compare the result with a run that was
never interrupted: the same adapter and merged weights, the same steps logged once each, and nothing
temporary left behind.

The kills are deterministic: the test-only EASYDISTILL_TEST_KILL hook (easydistill/faults.py) makes the
process SIGKILL itself at the named point. The resumes run `easydistill.kd.train.main` in this process (the
command's code, without a second interpreter start-up), so the killed processes are the only ones started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kd_helpers import kd_config, write_records
from safetensors.torch import load_file

from easydistill.train.checkpoints import COMPLETE, checkpoint_problem, checkpoints

REPO = Path(__file__).resolve().parents[1]

# kill point -> what the resume must say
KILLS = {
    "step@1": "no complete checkpoint",  # before the first checkpoint: a fresh start
    "step@3": "resume: from",  # mid-step, after checkpoint-2
    "checkpoint_save@4": "resume: from",  # checkpoint-4 half written (weights, no optimizer yet)
    "final_save": "writing the final export",  # the final model written to its temporary folder only
    "merge": "writing the final export",  # the merged model written, not yet checked nor renamed
}


def run_config(tiny_pair, data, out: Path, **training) -> dict:
    return kd_config(
        tiny_pair,
        data,
        out,
        training={"max_steps": 5, "save_strategy": "steps", "save_steps": 2, **training},
        lora={"dropout": 0.1, "save_merged_model": True},
    )


def start_killed_run(config_path: Path, point: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EASYDISTILL_TEST_KILL": point}
    command = [sys.executable, "-m", "easydistill.kd.train", "--config", str(config_path)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kd_train(config: dict, path: Path) -> None:
    from easydistill.kd.train import main

    path.write_text(json.dumps(config))
    assert main(["--config", str(path)]) == 0


def weights(folder: Path, name: str):
    return load_file(str(folder / name))


def logged_steps(out: Path) -> list[int]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [e["step"] for e in history if "loss" in e]


def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(tiny_pair, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", n=24)
    processes = {}
    pending = list(KILLS)
    reference = tmp_path / "reference"
    started = False
    while pending or processes:
        # Two killed runs at a time beside this process: the machine has few cores.
        while pending and len(processes) < 2:
            point = pending.pop(0)
            out = tmp_path / point.replace("@", "-")
            path = tmp_path / f"{out.name}.json"
            path.write_text(json.dumps(run_config(tiny_pair, data, out)))
            processes[point] = (start_killed_run(path, point), out)
        if not started:  # the uninterrupted run, while the first killed ones start
            kd_train(run_config(tiny_pair, data, reference), tmp_path / "reference.json")
            started = True
        for point, (process, out) in list(processes.items()):
            if process.poll() is None:
                continue
            log = process.stdout.read()
            assert process.returncode == -signal.SIGKILL, f"{point}: not killed at its point\n{log}"
            del processes[point]
            check_resume(tiny_pair, data, out, point, reference, tmp_path, capsys)
        time.sleep(0.2)


def check_resume(tiny_pair, data, out: Path, point: str, reference: Path, tmp_path: Path, capsys) -> None:
    assert not (out / COMPLETE).exists(), point
    assert not (out / "adapter_model.safetensors").exists() or point == "merge", point
    for _, folder in checkpoints(out):  # what the kill left: only complete checkpoints carry the name
        assert checkpoint_problem(folder) is None, (point, folder)
    capsys.readouterr()
    kd_train(
        run_config(tiny_pair, data, out, resume_from_checkpoint=True), tmp_path / f"{out.name}-resume.json"
    )
    said = capsys.readouterr().out
    resume_lines = [line for line in said.splitlines() if line.startswith("resume:")]
    assert len(resume_lines) == 1 and KILLS[point] in resume_lines[0], (point, said)

    assert logged_steps(out) == [1, 2, 3, 4, 5], point  # no step lost, none taken twice or past the end
    for name, sub in (("adapter_model.safetensors", ""), ("model.safetensors", "merged_model")):
        a, b = weights(reference / sub, name), weights(out / sub, name)
        assert a.keys() == b.keys(), (point, name)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst == 0.0, (point, name, worst)  # bitwise on CPU; on GPU kernels allow 1e-6
    assert (out / COMPLETE).is_file(), point
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], point
    assert [step for step, _ in checkpoints(out)] == [2, 4, 5], point


def test_resuming_a_finished_run_changes_nothing(tiny_pair, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", n=24)
    out = tmp_path / "out"
    kd_train(run_config(tiny_pair, data, out), tmp_path / "a.json")

    def written():  # the run marker (the resolved config) is rewritten by every start, resume included
        return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "easydistill_config.json"}

    before = written()
    capsys.readouterr()
    kd_train(run_config(tiny_pair, data, out, resume_from_checkpoint=True), tmp_path / "b.json")
    assert "finished at step 5; nothing to do" in capsys.readouterr().out
    assert written() == before
    assert logged_steps(out) == [1, 2, 3, 4, 5]
