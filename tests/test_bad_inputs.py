"""Bad inputs a user can give (issue #15, point 4 and the numbers of point 2): each one ends with exit code 2 and
one message naming its JSON path or file, no traceback, and nothing written that would block the corrected rerun.

Values go into the config file as JSON text (NaN, Infinity, 1e400 are what a user's file holds). Folder cases
break a private copy of a real tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kd_helpers import kd_config, write_records

from easydistill import cli, merge, validate
from easydistill.kd import train as kd_train


@pytest.fixture()
def models(tiny_pair, tmp_path) -> tuple[Path, Path]:
    teacher, student = tmp_path / "models/teacher", tmp_path / "models/student"
    shutil.copytree(tiny_pair[0], teacher)
    shutil.copytree(tiny_pair[1], student)
    return teacher, student


@pytest.fixture()
def base(models, tmp_path) -> dict:
    return kd_config(models, write_records(tmp_path / "train.jsonl", n=8), tmp_path / "out")


def write(raw: dict, tmp_path: Path, replace: dict[str, str] | None = None) -> Path:
    """The config as a file; each `"@key@"` string in it becomes the raw JSON text `replace[key]`."""
    text = json.dumps(raw, indent=1)
    for key, literal in (replace or {}).items():
        text = text.replace(f'"@{key}@"', literal)
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def refused(main, argv, capsys) -> str:
    """Run an entry point in-process; it must exit 2 with one message and no traceback. Returns stderr."""
    with pytest.raises(SystemExit) as info:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def edit(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


# (id, dotted key, JSON text of the value, text the message must contain)
NUMBERS = [
    ("nan-kd-ratio", "distillation.kd_ratio", "NaN", "$.distillation.kd_ratio: NaN is not a finite number"),
    ("inf-temperature", "distillation.temperature", "Infinity", "$.distillation.temperature: Infinity"),
    ("1e400-lora-alpha", "lora.alpha", "1e400", "$.lora.alpha: Infinity (or a number too large"),
    ("nan-learning-rate", "training.learning_rate", "NaN", "$.training.learning_rate: NaN"),
    ("minus-inf-weight-decay", "training.weight_decay", "-Infinity", "$.training.weight_decay: Infinity"),
    ("huge-max-steps", "training.max_steps", "1" + "0" * 30, "$.training.max_steps: the integer"),
    ("huge-lora-r", "lora.r", "9" * 25, "$.lora.r: the integer"),
    (
        "lora-r-past-the-weights",
        "lora.r",
        str(2**40),
        "$.lora.r: 1099511627776 is larger than every dimension",
    ),
    ("digits-past-the-reader", "training.max_steps", "9" * 5000, "cannot be read as JSON"),
    ("negative-seed", "training.seed", "-1", "$.training.seed: -1 is out of range"),
    ("seed-past-32-bits", "training.seed", str(2**40), "$.training.seed: 1099511627776 is out of range"),
    ("negative-data-seed", "dataset.seed", "-7", "$.dataset.seed: -7 is out of range"),
    (
        "zero-batch",
        "training.per_device_train_batch_size",
        "0",
        "per_device_train_batch_size: 0 must be at least 1",
    ),
    (
        "negative-batch",
        "training.per_device_train_batch_size",
        "-4",
        "per_device_train_batch_size: -4 must be at",
    ),
    (
        "zero-accumulation",
        "training.gradient_accumulation_steps",
        "0",
        "gradient_accumulation_steps: 0 must be",
    ),
    (
        "negative-accumulation",
        "training.gradient_accumulation_steps",
        "-2",
        "gradient_accumulation_steps: -2",
    ),
    (
        "negative-learning-rate",
        "training.learning_rate",
        "-0.1",
        "$.training.learning_rate: -0.1 must not be",
    ),
    ("max-steps-zero", "training.max_steps", "0", "$.training.max_steps: 0 trains nothing"),
    ("zero-logging-steps", "training.logging_steps", "0", "$.training.logging_steps: 0 must be positive"),
    ("nul-in-path", "dataset.labeled_path", '"data\\u0000.jsonl"', "$.dataset.labeled_path: contains a NUL"),
    ("nul-in-student", "models.student", '"/models/st\\u0000"', "$.models.student: contains a NUL character"),
    ("deep-nesting", "lora.target_modules", "[" * 100_000 + "]" * 100_000, "nested too deeply to read"),
    ("nesting-past-the-limit", "lora.target_modules", "[" * 40 + "]" * 40, "nested more than 32 levels"),
]


@pytest.mark.parametrize("case,key,literal,expected", NUMBERS, ids=[n[0] for n in NUMBERS])
def test_bad_number_refused_by_validate_and_train(case, key, literal, expected, base, tmp_path, capsys):
    path = write(edit(base, key, "@v@"), tmp_path, {"v": literal})
    for main in (validate.main, kd_train.main):
        assert expected in refused(main, ["--config", str(path)], capsys)
    assert not (tmp_path / "out").exists()


def test_no_epochs_refused(base, tmp_path, capsys):
    """num_train_epochs 0 used to save the untrained student as the result."""
    edit(base, "training.max_steps", -1)
    path = write(edit(base, "training.num_train_epochs", 0), tmp_path)
    err = refused(kd_train.main, ["--config", str(path)], capsys)
    assert "$.training.num_train_epochs: 0 trains nothing" in err
    edit(base, "training.max_steps", 3)  # a positive max_steps decides the length: then epochs do not matter
    assert refused_or_ok(validate.main, write(base, tmp_path), capsys) == 0


def refused_or_ok(main, path: Path, capsys) -> int:
    with pytest.raises(SystemExit) as info:
        cli.run(main, ["--config", str(path)])
    capsys.readouterr()
    return info.value.code


@pytest.mark.parametrize("key", ["eval_strategy", "evaluation_strategy"])
def test_eval_strategy_without_eval_data(key, base, tmp_path, capsys):
    path = write(edit(base, f"training.{key}", "steps"), tmp_path)
    err = refused(validate.main, ["--config", str(path)], capsys)
    assert "$.training.eval_strategy: 'steps' evaluates during training, but there is no eval data" in err
    edit(base, "dataset.eval_ratio", 0.25)
    assert refused_or_ok(validate.main, write(base, tmp_path), capsys) == 0


def test_every_problem_of_a_file_at_once(base, tmp_path, capsys):
    edit(base, "training.seed", -1)
    edit(base, "training.per_device_train_batch_size", 0)
    edit(base, "training.max_steps", 0)
    err = refused(validate.main, ["--config", str(write(base, tmp_path))], capsys)
    assert "3 problems" in err


@pytest.mark.parametrize(
    "name,text,where",
    [
        (
            "deep.jsonl",
            '{"instruction": "a", "output": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            "deep.jsonl:1:",
        ),
        ("deep.json", "[" + "[" * 100_000 + "]" * 100_000 + "]", "deep.json:1:2:"),
        ("digits.jsonl", '{"instruction": "a", "output": ' + "9" * 5000 + "}\n", "digits.jsonl:1:"),
    ],
)
def test_unreadable_data_file_named_with_its_line(name, text, where, base, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    path = write(edit(base, "dataset.labeled_path", str(tmp_path / name)), tmp_path)
    err = refused(validate.main, ["--config", str(path)], capsys)
    assert f"$.dataset.labeled_path: {tmp_path / where} cannot be read as JSON" in err


# ---------------------------------------------------------------- model folders, read as bytes


def _corrupt_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "qwen2", "vocab_size": ')
    return "config.json:1:39: invalid JSON"


def _config_not_an_object(folder: Path) -> str:
    (folder / "config.json").write_text("[1, 2]")
    return "config.json: must hold a JSON object, not list"


def _truncated_weights(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return "model.safetensors: truncated or damaged"


def _cut_in_the_header(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return "model.safetensors: truncated or not safetensors"


def _no_tokenizer(folder: Path) -> str:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    return "holds no tokenizer files"


def _pickle_weights(folder: Path) -> str:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return "holds no model.safetensors, only pytorch_model.bin (pickle)"


def _bitsandbytes_model(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    return "quantized with bitsandbytes, which needs the bitsandbytes package"


FOLDERS = [_corrupt_config, _config_not_an_object, _truncated_weights, _cut_in_the_header, _no_tokenizer]
FOLDERS += [_pickle_weights, _bitsandbytes_model]


@pytest.mark.parametrize("damage", FOLDERS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_damaged_model_folder_named_by_validate(damage, which, models, base, tmp_path, capsys):
    folder = models[0] if which == "teacher" else models[1]
    expected = damage(folder)
    err = refused(validate.main, ["--config", str(write(base, tmp_path))], capsys)
    assert f"$.models.{which}: {folder}" in err and expected in err, err
    assert "tokenizer" not in err or damage is _no_tokenizer, "not a tokenizer problem: " + err
    assert not (tmp_path / "out").exists()


def test_optimizer_and_engine_packages_named(base, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("deepspeed", "bitsandbytes") else real_find_spec(name, *a),
    )
    edit(base, "training.optim", "adamw_bnb_8bit")
    edit(base, "training.deepspeed", {"zero_optimization": {"stage": 2}})
    err = refused(validate.main, ["--config", str(write(base, tmp_path))], capsys)
    assert "$.training.optim: 'adamw_bnb_8bit' needs the bitsandbytes package" in err
    assert "$.training.deepspeed: a DeepSpeed config needs the deepspeed package" in err


# ---------------------------------------------------------------- adapters: safetensors only


def _bin_adapter(models, tmp_path) -> Path:
    """A real PEFT adapter folder whose weights are adapter_model.bin (as older PEFT saved them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models[1]),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    folder = tmp_path / "adapter"
    peft.save_pretrained(folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder


def test_pickle_adapter_refused_by_init_from_and_merge(models, base, tmp_path, capsys):
    adapter = _bin_adapter(models, tmp_path)
    capsys.readouterr()
    edit(base, "lora.init_from", str(adapter))
    err = refused(kd_train.main, ["--config", str(write(base, tmp_path))], capsys)
    assert f"$.lora.init_from: {adapter}: holds adapter_model.bin, a pickle" in err
    argv = ["--base", str(models[1]), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]
    err = refused(merge.main, argv, capsys)
    assert "--adapter" in err and "adapter_model.bin, a pickle" in err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the file system: full, read-only, denied


def _can_mount() -> bool:
    """Private mount namespaces (root, or CAP_SYS_ADMIN) let a test mount a tiny tmpfs or a read-only view."""
    import subprocess

    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def in_mount_namespace(script: str, tmp_path: Path):
    """Run a shell script in a private mount namespace (its mounts vanish with it); returns the process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    (tmp_path / "script.sh").write_text("set -u\n" + script)
    return subprocess.run(
        ["unshare", "-m", "sh", str(tmp_path / "script.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


REPO = Path(__file__).resolve().parents[1]
needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs private mount namespaces (unshare -m)")


@needs_mounts
def test_full_disk_is_one_message_and_the_rerun_works(base, tmp_path):
    """kd.train on a 24 KB file system: exit 2 naming the folder; with space, nothing left blocks the rerun."""
    disk = tmp_path / "disk"
    disk.mkdir()
    path = write(edit(base, "training.output_dir", str(disk / "out")), tmp_path)
    train = f'"$PYTHON" -m easydistill.kd.train --config {path}'
    proc = in_mount_namespace(
        f"mount -t tmpfs -o size=24k tmpfs {disk}\n"
        f"{train} 2> {tmp_path}/first.err; echo first=$?\n"
        f"mount -o remount,size=20m {disk}\n"
        f'"$PYTHON" -m easydistill.validate --config {path} > /dev/null 2> {tmp_path}/second.err; echo second=$?\n',
        tmp_path,
    )
    first = (tmp_path / "first.err").read_text()
    assert "first=2" in proc.stdout, first
    assert f"error: {disk / 'out'}: no space left on the device" in first and "Traceback" not in first
    assert "second=0" in proc.stdout, (tmp_path / "second.err").read_text()


@needs_mounts
def test_read_only_file_system_refused_before_anything_loads(base, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    path = write(edit(base, "training.output_dir", str(ro / "out")), tmp_path)
    proc = in_mount_namespace(
        f"mount --bind -o ro {ro} {ro}\n"
        f'"$PYTHON" -X importtime -m easydistill.kd.train --config {path}; echo rc=$?\n',
        tmp_path,
    )
    assert "rc=2" in proc.stdout, proc.stderr
    assert f"$.training.output_dir: {str(ro / 'out')!r} is on a read-only file system" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported, "refused before the models (and torch) load"


def test_permission_denied_refused_before_anything_loads(base, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the denial is simulated where validation asks for it (os.access)."""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    err = refused(kd_train.main, ["--config", str(write(base, tmp_path))], capsys)
    assert f"$.training.output_dir: {str(tmp_path / 'out')!r} cannot be written: permission denied" in err


@pytest.mark.parametrize(
    "exc",
    [
        OSError(28, "No space left on device", "/runs/x/model.safetensors"),
        PermissionError(13, "Permission denied", "/runs/x/model.safetensors"),
        OSError(30, "Read-only file system", "/runs/x/model.safetensors"),
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),
        Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'
        ),
    ],
    ids=["enospc", "eacces", "erofs", "torch-save", "safetensors"],
)
def test_write_failures_become_one_user_error(exc):
    from easydistill.errors import UserError, file_system_errors

    with pytest.raises(UserError) as info, file_system_errors("/runs/x"):
        raise exc
    assert str(info.value).startswith("/runs/x")
    with (
        pytest.raises(KeyError),
        file_system_errors("/runs/x"),
    ):  # anything else is a bug: its traceback stays
        raise KeyError("other")
