"""Output folders: a run never writes where it reads, never into someone else's folder; run ids; merge --out.

The model folders here are real tiny models, copied per test; each refusal asserts their bytes are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from kd_helpers import kd_config, train, write_records

from easydistill import cli, merge, run_folder, validate
from easydistill.config import load_config
from easydistill.errors import UserError
from easydistill.kd import train as kd_train


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks followed) with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def models(tiny_pair, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny pair: a failing guard must not damage the session's shared folders."""
    teacher, student = (tmp_path / "models/teacher", tmp_path / "models/student")
    shutil.copytree(tiny_pair[0], teacher)
    shutil.copytree(tiny_pair[1], student)
    return teacher, student


@pytest.fixture()
def data(tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    return write_records(tmp_path / "data/train.jsonl", n=16)


def run_cli(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.run(main, argv)
    return info.value.code, capsys.readouterr().err


def write_config(raw: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def _adapter(tmp_path: Path) -> Path:
    """A PEFT adapter folder to continue from (lora.init_from)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models/student")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# (case, how output_dir is chosen given tmp_path, text of the refusal)
REFUSED = [
    ("student", lambda t: t / "models/student", "is the model folder $.models.student"),
    ("teacher", lambda t: t / "models/teacher", "is the model folder $.models.teacher"),
    ("symlink-to-teacher", lambda t: t / "link", "is the model folder $.models.teacher"),
    ("inside-student", lambda t: t / "models/student/run", "lies inside the model folder $.models.student"),
    ("contains-models", lambda t: t / "models", "contains the model folder $.models.student"),
    ("init-from-adapter", lambda t: t / "adapter", "is the model folder $.lora.init_from"),
    ("config-folder", lambda t: t / "conf", "is the folder of the config file itself"),
    ("data-folder", lambda t: t / "data", "is the folder of $.dataset.labeled_path"),
    ("someone-elses-model", lambda t: t / "other", "is not empty (chat_template.jinja, config.json"),
]


@pytest.mark.parametrize("case,choose,expected", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite_output_dir"])
def test_output_dir_refused_before_anything_loads(
    case, choose, expected, overwrite, models, data, tmp_path, capsys
):
    (tmp_path / "link").symlink_to(models[0])
    shutil.copytree(models[0], tmp_path / "other")  # a model that is no input of the run
    (tmp_path / "conf").mkdir()
    lora = {"init_from": str(_adapter(tmp_path))} if case == "init-from-adapter" else {}
    out = choose(tmp_path)
    raw = kd_config(models, data, out, lora=lora, training={"overwrite_output_dir": overwrite})
    path = write_config(raw, tmp_path / "conf/config.json")
    before = digest(tmp_path)
    code, err = run_cli(kd_train.main, ["--config", str(path)], capsys)
    assert code == 2, err
    assert f"$.training.output_dir: {str(out)!r} {expected}" in err, err
    assert "Traceback" not in err
    assert digest(tmp_path) == before, "a refused run changed files"


def test_output_dir_dot_beside_the_config(models, data, tmp_path, capsys, monkeypatch):
    """The issue's case: output_dir "." next to the run's own config.json."""
    monkeypatch.chdir(tmp_path / "data")
    path = write_config(kd_config(models, data, Path(".")), tmp_path / "data/config.json")
    before = digest(tmp_path)
    code, err = run_cli(kd_train.main, ["--config", "config.json"], capsys)
    assert code == 2 and "is the folder of the config file itself" in err, err
    assert digest(tmp_path) == before and path.is_file()


def test_marker_without_results_does_not_block_the_rerun(models, data, tmp_path, capsys):
    """A run that stopped before saving anything (only the markers) leaves nothing to keep: rerun allowed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / run_folder.RUN_CONFIG).write_text("{}")
    run_folder.stamp(out, "earlier")
    (out / "teacher_answers.json").write_text("[]")  # precomputed teacher output: an input, kept
    code, err = run_cli(
        validate.main,
        ["--config", str(write_config(kd_config(models, data, out), tmp_path / "c.json"))],
        capsys,
    )
    assert code == 0, err


def test_folder_with_only_precomputed_teacher_answers_is_usable(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "teacher_answers.json").write_text("[]")
    path = write_config(kd_config(models, data, out), tmp_path / "c.json")
    assert run_cli(validate.main, ["--config", str(path)], capsys)[0] == 0


def test_read_only_output_location(models, data, tmp_path, monkeypatch):
    """A read-only mount is named before anything loads (statvfs reports it; here it is made to)."""
    import os

    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    problems = run_folder.output_dir_problems(load_config(kd_config(models, data, tmp_path / "new/out")))
    assert problems == [
        f"$.training.output_dir: {str(tmp_path / 'new/out')!r} is on a read-only file system ({str(tmp_path)!r})"
    ]


def test_overwrite_clears_the_earlier_run_and_a_new_id_is_recorded(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    first = kd_config(models, data, out, training={"max_steps": 2, "save_strategy": "steps", "save_steps": 1})
    train(first)
    first_id = run_folder.run_id(out)
    assert first_id and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert {run_folder.run_id(p) for p in out.glob("checkpoint-*")} == {first_id}
    (out / "teacher_answers.json").write_text("[]")

    # Without overwrite (or resume) the earlier run is refused.
    path = write_config(first, tmp_path / "c.json")
    code, err = run_cli(validate.main, ["--config", str(path)], capsys)
    assert code == 2 and "already holds a run" in err

    second = kd_config(models, data, out, training={"max_steps": 1, "overwrite_output_dir": True})
    train(second)
    assert capsys.readouterr().out.count("overwrite_output_dir: removing the earlier run") == 1
    assert not list(out.glob("checkpoint-*")), "the earlier run's checkpoints must go"
    assert run_folder.run_id(out) not in (None, first_id)
    assert (out / "teacher_answers.json").read_text() == "[]"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_refuses_a_checkpoint_of_another_run(models, data, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    run_folder.stamp(out, "this-run")
    run_folder.stamp(out / "checkpoint-4", "other-run")
    cfg = load_config(kd_config(models, data, out, training={"resume_from_checkpoint": True}))
    with pytest.raises(UserError, match="was written by another run"):
        run_folder.check_resume(cfg, True)
    run_folder.stamp(out / "checkpoint-4", "this-run")
    run_folder.check_resume(cfg, True)
    assert run_folder.checkpoint_belongs_to_run(out / "checkpoint-4", out)


# ---------------------------------------------------------------- merge --out


@pytest.fixture()
def finished_run(models, data, tmp_path) -> Path:
    out = tmp_path / "run"
    train(kd_config(models, data, out, training={"max_steps": 1}))
    return out


def test_merge_never_deletes_the_training_run_or_an_input(models, finished_run, tmp_path, capsys):
    base = models[1]
    before = digest(tmp_path)
    for out in (finished_run, base, tmp_path / "models", tmp_path / "models/student/merged"):
        argv = ["--base", str(base), "--adapter", str(finished_run), "--out", str(out), "--overwrite"]
        code, err = run_cli(merge.main, argv, capsys)
        assert code == 2 and "--out" in err and "Traceback" not in err, err
    assert digest(tmp_path) == before


def test_merge_overwrite_replaces_only_an_earlier_merge(models, finished_run, tmp_path, capsys):
    base, out = models[1], tmp_path / "merged"
    argv = ["--base", str(base), "--adapter", str(finished_run), "--out", str(out)]
    assert run_cli(merge.main, argv, capsys)[0] == 0
    assert (out / run_folder.MERGE_MARKER).is_file()
    code, err = run_cli(merge.main, argv, capsys)
    assert code == 2 and "pass --overwrite" in err
    assert run_cli(merge.main, [*argv, "--overwrite"], capsys)[0] == 0
    other = tmp_path / "someone"
    shutil.copytree(models[0], other)
    before = digest(other)
    code, err = run_cli(merge.main, [*argv[:-1], str(other), "--overwrite"], capsys)
    assert code == 2 and "not a model easydistill.merge wrote" in err
    assert digest(other) == before


# ---------------------------------------------------------------- where easydistill.eval writes


def test_eval_output_never_replaces_silently_nor_writes_an_input(models, data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(kd_config(models, data, out))
    assert run_folder.eval_output(cfg, None, False) is None, (
        "no run folder: nothing written (not ./eval.json)"
    )
    out.mkdir()
    run_folder.stamp(out, "r")
    assert run_folder.eval_output(cfg, None, False) == out / "eval.json"
    (out / "eval.json").write_text("{}")
    assert run_folder.eval_output(cfg, None, False) == out / "eval-2.json"
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    with pytest.raises(UserError, match="pass --overwrite"):
        run_folder.eval_output(cfg, str(mine), False)
    assert run_folder.eval_output(cfg, str(mine), True) == mine
    for victim in (models[1] / "config.json", data, models[0] / "new.json"):
        with pytest.raises(UserError, match="which the run reads"):
            run_folder.eval_output(cfg, str(victim), True)
