"""Config validation: shipped configs, EasyDistill v1 shapes, and bad configs rejected with exit code 2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easydistill import cli, validate
from easydistill.config import load_config
from easydistill.config.docs import render
from easydistill.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.fixture()
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"{i}+{i}=", "output": str(2 * i)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def v1_config(tiny_pair, data_file, tmp_path) -> dict:
    """An EasyDistill v1-shaped file (with a lora block) pointing at tiny local models."""
    teacher, student = tiny_pair
    return {
        "job_type": "kd_white_box_train_only",
        "dataset": {
            "labeled_path": str(data_file),
            "template": str(REPO / "easydistill/templates/chatml_v1.jinja"),
            "seed": 42,
        },
        "inference": {
            "enable_chunked_prefill": True,
            "seed": 777,
            "gpu_memory_utilization": 0.9,
            "temperature": 0.8,
            "trust_remote_code": True,
            "enforce_eager": False,
            "max_model_len": 512,
            "max_new_tokens": 400,
            "top_logits_num": 20,
        },
        "distillation": {"kd_ratio": 0.5, "max_seq_length": 512, "distillation_type": "forward_kld"},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "num_train_epochs": 3,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 8,
            "save_steps": 2000,
            "logging_steps": 1,
            "learning_rate": 2e-05,
            "weight_decay": 0.05,
            "warmup_ratio": 0.1,
            "lr_scheduler_type": "cosine",
        },
        "lora": {
            "enable": True,
            "r": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "dropout": 0.05,
            "bias": "none",
            "save_merged_model": True,
        },
    }


def run_validate(config: dict | str, tmp_path: Path, capsys) -> tuple[int, str, str]:
    if isinstance(config, dict):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
    else:
        path = Path(config)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(validate.main, ["--config", str(path)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_schema_valid(path):
    cfg = load_config(path)
    assert cfg.warnings == []
    first_key = next(iter(json.loads(path.read_text())))
    assert first_key == "$comment" and "python -m easydistill" in json.loads(path.read_text())["$comment"]


def test_v1_shape_validates_against_real_folders(v1_config, tmp_path, capsys):
    code, out, err = run_validate(v1_config, tmp_path, capsys)
    assert code == 0, err
    assert "job:        kd_white_box_train_only" in out
    assert "lora:       r=8" in out and "q_proj, v_proj" in out
    assert "warmup_ratio" in out + err  # the v1 spelling is mapped and said so
    assert not (tmp_path / "out").exists()  # validation writes nothing


def test_v1_multi_teacher_shape(v1_config, tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    raw = copy.deepcopy(v1_config)
    raw["job_type"] = "kd_white_box_train_only_multi"
    raw["models"]["teacher"] = [str(teacher), str(teacher)]
    raw["dataset"]["logits_path"] = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    cfg = load_config(raw)
    assert [t.kind for t in cfg.teachers] == ["cached", "cached"]
    assert [t.weight for t in cfg.teachers] == [0.5, 0.5]
    assert cfg.teachers[1].logits_path.endswith("b.jsonl")
    assert len({t.name for t in cfg.teachers}) == 2


def test_defaults_filled_and_resolved_config_revalidates(v1_config):
    cfg = load_config(v1_config)
    assert cfg.distillation.temperature == 1.0 and cfg.distillation.beta == 0.5
    assert cfg.training.warmup_steps == 0.1 and "warmup_ratio" not in cfg.data["training"]
    again = load_config(json.loads(cfg.to_json()))
    assert again.data == cfg.data


def test_self_teacher_resolution(v1_config, tiny_pair):
    _, student = tiny_pair
    for teacher in ("self", str(student), str(student) + "/"):
        raw = copy.deepcopy(v1_config)
        raw["models"]["teacher"] = teacher
        cfg = load_config(raw)
        assert [t.kind for t in cfg.teachers] == ["self"]


def test_pure_kd_self_teacher_warns(v1_config):
    raw = copy.deepcopy(v1_config)
    raw["models"]["teacher"] = "self"
    raw["distillation"]["kd_ratio"] = 1.0
    cfg = load_config(raw)
    assert any("B matrices start at 0" in w for w in cfg.warnings)
    raw["distillation"].update(kd_ratio=0.5, lmbda=1.0)
    assert any("nothing trains" in w for w in load_config(raw).warnings)
    raw["distillation"].update(lmbda=0.5)
    assert not any("B matrices" in w for w in load_config(raw).warnings)


def test_max_length_from_sft_key(v1_config):
    raw = copy.deepcopy(v1_config)
    del raw["distillation"]["max_seq_length"]
    raw["training"]["max_length"] = 96
    assert load_config(raw).max_length == 96


def test_config_docs_are_fresh():
    assert (REPO / "docs/config.md").read_text() == render(), "docs/config.md is stale: run `make docs`"


def test_every_schema_key_has_a_description():
    from easydistill.config import schema

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{key} has no description"
            walk(sub, f"{path}.{key}")

    walk(schema(), "$")
    walk(schema()["$defs"]["teacher_entry"], "$.models.teacher[]")


def _set(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()

# (id, edits, text the message must contain). Each edit: (dotted key, value) applied to the v1 config.
BAD = [
    ("wrong-type-r", [("lora.r", "eight")], "$.lora.r: 'eight' is not of type 'integer'"),
    ("negative-r", [("lora.r", -4)], "$.lora.r: -4 is less than the minimum of 1"),
    (
        "kd-ratio-range",
        [("distillation.kd_ratio", 1.5)],
        "$.distillation.kd_ratio: 1.5 is greater than the maximum",
    ),
    ("temperature-zero", [("distillation.temperature", 0)], "$.distillation.temperature"),
    ("beta-range", [("distillation.beta", -0.1)], "$.distillation.beta"),
    (
        "unknown-type",
        [("distillation.distillation_type", "kld")],
        "$.distillation.distillation_type: 'kld' is not one of",
    ),
    ("misspelt-block", [("trainig", {})], "$.trainig: unknown key; did you mean 'training'?"),
    ("misspelt-lora-key", [("lora.alpah", 3)], "$.lora.alpah: unknown key; did you mean 'alpha'?"),
    (
        "misspelt-training-key",
        [("training.learnig_rate", 1e-4)],
        "$.training.learnig_rate: unknown TrainingArguments key; did you mean 'learning_rate'?",
    ),
    (
        "training-type",
        [("training.num_train_epochs", "three")],
        "$.training.num_train_epochs: 'three' is not of type 'number'",
    ),
    ("missing-student", [("models.student", _DELETE)], "$.models: 'student' is a required property"),
    (
        "missing-output-dir",
        [("training.output_dir", _DELETE)],
        "$.training: 'output_dir' is a required property",
    ),
    ("missing-data", [("dataset.labeled_path", _DELETE)], "$.dataset.labeled_path: required"),
    ("bad-job", [("job_type", "kd_white_box_multi")], "$.job_type: 'kd_white_box_multi' is not one of"),
    ("bad-bias", [("lora.bias", "nope")], "$.lora.bias: 'nope' is not one of 'none', 'all', 'lora_only'"),
    (
        "target-modules-string",
        [("lora.target_modules", "q_proj")],
        "$.lora.target_modules: 'q_proj' is not \"all-linear\"",
    ),
    ("teacher-number", [("models.teacher", 3)], "$.models.teacher: 3 is not a folder"),
    (
        "teacher-object-typo",
        [("models.teacher", [{"pth": "x"}])],
        "$.models.teacher[0].pth: unknown key; did you mean 'path'?",
    ),
    (
        "self-without-lora",
        [("models.teacher", "self"), ("lora.enable", False)],
        "self-distillation needs LoRA adapters on the student",
    ),
    (
        "logits-count",
        [("dataset.logits_path", ["a.jsonl", "b.jsonl"])],
        "$.dataset.logits_path: 2 logits files for 1 teacher",
    ),
    (
        "lora-target-missing",
        [("lora.target_modules", ["q_proj", "query_key_value"])],
        "$.lora.target_modules: 'query_key_value' does not exist",
    ),
    (
        "student-folder-missing",
        [("models.student", "/nonexistent/student")],
        "$.models.student: '/nonexistent/student' is not a folder",
    ),
    (
        "teacher-folder-missing",
        [("models.teacher", "/nonexistent/teacher")],
        "$.models.teacher: '/nonexistent/teacher' is not a folder",
    ),
    (
        "data-file-missing",
        [("dataset.labeled_path", "/nonexistent/train.jsonl")],
        "$.dataset.labeled_path: no such file",
    ),
    ("template-missing", [("dataset.template", "/nonexistent/t.jinja")], "$.dataset.template: no such file"),
    ("dropout-range", [("lora.dropout", 1.0)], "$.lora.dropout"),
    (
        "on-policy-cached",
        [("distillation.lmbda", 0.5), ("dataset.logits_path", "x.jsonl")],
        "need teachers that score new text",
    ),
    (
        "schedule-and-lmbda",
        [("distillation.lmbda", 0.5), ("distillation.lmbda_schedule", {"start": 0, "end": 1})],
        "keep one",
    ),
    (
        "schedule-kind",
        [("distillation.lmbda_schedule", {"start": 0, "end": 1, "kind": "exp"})],
        "$.distillation.lmbda_schedule.kind",
    ),
    (
        "train-only-logits-missing",
        [("dataset.logits_path", "/nonexistent/logits.jsonl")],
        "no stored teacher logits",
    ),
    ("max-length-conflict", [("training.max_length", 64)], "the sequence limit is set to different values"),
    (
        "api-job-prompts-only",
        [
            ("job_type", "kd_black_box_api"),
            ("dataset.instruction_path", "prompts.json"),
            ("dataset.labeled_path", _DELETE),
        ],
        '$.job_type: kd_black_box_api asks a remote API to answer dataset.instruction_path, which easydistill does not do. To have a local model answer, set job_type to "kd_black_box_local"',
    ),
    ("mmkd-job", [("job_type", "mmkd_white_box")], "multimodal distillation is not supported"),
    (
        "logger-not-installed",
        [("training.report_to", ["wandb"])],
        "$.training.report_to: wandb is not installed",
    ),
    ("weights-zero", [("models.teacher", [{"path": "x", "weight": 0}])], "the teacher weights sum to 0"),
]


@pytest.mark.parametrize("case_id,edits,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_rejected(case_id, edits, expected, v1_config, tmp_path, capsys):
    raw = copy.deepcopy(v1_config)
    for key, value in edits:
        _set(raw, key, value)
    code, out, err = run_validate(raw, tmp_path, capsys)
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists()


def test_all_problems_reported_at_once(v1_config, tmp_path, capsys):
    raw = copy.deepcopy(v1_config)
    raw["lora"]["r"] = 0
    raw["distillation"]["kd_ratio"] = 2
    raw["models"]["stuent"] = "x"
    code, _, err = run_validate(raw, tmp_path, capsys)
    assert code == 2
    assert "3 problems" in err
    for path in ("$.lora.r", "$.distillation.kd_ratio", "$.models.stuent"):
        assert path in err


def test_mismatched_tokenizers(v1_config, mismatched_tokenizer_model, tmp_path, capsys):
    raw = copy.deepcopy(v1_config)
    raw["models"]["teacher"] = str(mismatched_tokenizer_model)
    code, out, _ = run_validate(raw, tmp_path, capsys)
    assert code == 0 and "$.models.teacher: cross-tokenizer distillation" in out  # auto, the default
    raw["distillation"]["cross_tokenizer"] = "off"
    code, _, err = run_validate(raw, tmp_path, capsys)
    assert code == 2
    assert "$.models.teacher: the teacher's tokenizer differs" in err and "tokens" in err


def test_padded_vocab_is_allowed_and_noted(v1_config, tmp_path, capsys):
    code, out, _ = run_validate(v1_config, tmp_path, capsys)
    assert code == 0
    assert "embedding rows differ" in out


def test_existing_run_is_not_overwritten(v1_config, tmp_path, capsys):
    out_dir = Path(v1_config["training"]["output_dir"])
    out_dir.mkdir()
    (out_dir / "easydistill_config.json").write_text("{}")
    (out_dir / "checkpoint-2").mkdir()
    code, _, err = run_validate(v1_config, tmp_path, capsys)
    assert code == 2 and "already holds a run" in err
    assert (out_dir / "easydistill_config.json").read_text() == "{}"


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"job_type": "kd_white_box",\n  "models": {,}}', "config.json:2:"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_malformed_json(text, expected, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(text)
    code, _, err = run_validate(str(path), tmp_path, capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_validate(str(tmp_path / "nope.json"), tmp_path, capsys)
    assert code == 2 and "nope.json: no such config file" in err


def test_cli_exit_code_in_a_real_process(v1_config, tmp_path):
    raw = copy.deepcopy(v1_config)
    raw["lora"]["r"] = -4
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "easydistill.validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "$.lora.r: -4 is less than the minimum of 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_error_lists_problems():
    with pytest.raises(ConfigError) as info:
        load_config({"models": {}, "training": {}})
    assert len(info.value.problems) >= 2


def test_preflight_reads_no_weights_and_is_fast(v1_config, tiny_pair, monkeypatch):
    """Validation of real folders must not read weights: make weights unreadable and time it."""
    import easydistill.preflight as preflight_module

    cfg = load_config(v1_config)
    preflight_module.preflight(cfg)  # warm imports
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    start = time.perf_counter()
    preflight_module.preflight(cfg)
    elapsed = time.perf_counter() - start
    # Typically ~0.1 s once imports are warm; the bound only catches a weight load or a hub lookup sneaking
    # in, with room for a busy shared machine.
    assert elapsed < 5.0, f"preflight of two model folders took {elapsed:.2f}s"
