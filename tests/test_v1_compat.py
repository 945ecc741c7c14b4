"""EasyDistill v1 users' own files run unchanged: files written here in v1's exact shapes (its chat template with
the `<|im_start|>assistant` / `assistant\\n` split and `-` whitespace control, its kd_* configs with their
relative paths, a kd_black_box_api file with answers, v1 logits lists, a v1 checkout's own easydistill/
folder), on tiny models built offline. docs/migration.md says the same key by key."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kd_helpers import kd_config

import easydistill
from easydistill import cli, validate
from easydistill.config import load_config
from easydistill.data import IGNORE_INDEX, load_records, render_and_tokenize
from easydistill.errors import UserError
from examples.synthetic import make_records

# EasyDistill v1's configs/chat_template/chat_template_kd.jinja, in shape: the generation prompt is rendered as
# "...<|im_end|>\n  <|im_start|>assistant\n" but the full text as "...<|im_end|>\n\n  <|im_start|>assistant\n"
# + output + "<|im_end|>-\n" (the `-` inside the string is v1's own), so the prompt is not a prefix of it.
V1_KD_TEMPLATE = (
    "{{'<|im_start|>system\\nYou answer in few words.<|im_end|>'}}\n"
    "{{'<|im_start|>user\\n' + message['content'] + '<|im_end|>'-}}\n"
    "{% if add_generation_prompt %}\n"
    "  {{'<|im_start|>assistant'-}}\n"
    "{% endif %}\n"
    "{% if add_output %}\n"
    "  {{'<|im_start|>assistant\\n' + message['output'] + '<|im_end|>-'}}\n"
    "{% endif %}"
)
TRAINING = {  # v1's training block, as its kd_* configs ship it (epochs and steps cut for a test)
    "output_dir": "./result/",
    "num_train_epochs": 1,
    "max_steps": 1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "max_length": 512,
    "save_steps": 1000,
    "logging_steps": 1,
    "learning_rate": 2e-5,
    "weight_decay": 0.05,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "cosine",
    "disable_tqdm": True,
}


@pytest.fixture()
def v1_folder(tmp_path, tiny_pair, monkeypatch) -> Path:
    """A working folder laid out as v1's configs expect: chat_template/, data/, the models at v1's paths."""
    teacher, student = tiny_pair
    (tmp_path / "chat_template").mkdir()
    (tmp_path / "chat_template/chat_template_kd.jinja").write_text(V1_KD_TEMPLATE)
    (tmp_path / "data").mkdir()
    records = [{**r, "input": ""} for r in make_records("add", 6, seed=3)]
    (tmp_path / "data/alpaca_en_demo.json").write_text(json.dumps(records, indent=2))
    for path, target in (
        ("teacher/Qwen/Qwen2.5-7B-Instruct", teacher),
        ("student/Qwen/Qwen2.5-0.5B-Instruct", student),
    ):
        (tmp_path / path).parent.mkdir(parents=True)
        (tmp_path / path).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def v1_white_box() -> dict:
    """configs/kd_white_box.json of v1, as shipped (generation length cut for a test)."""
    return {
        "job_type": "kd_white_box",
        "dataset": {
            "instruction_path": "data/alpaca_en_demo.json",
            "labeled_path": "data/alpaca_en_demo_labeled.json",
            "logits_path": "./logits.json",
            "template": "./chat_template/chat_template_kd.jinja",
            "seed": 42,
        },
        "inference": {
            "enable_chunked_prefill": True,
            "seed": 777,
            "gpu_memory_utilization": 0.9,
            "temperature": 0.8,
            "trust_remote_code": True,
            "enforce_eager": False,
            "max_model_len": 4096,
            "max_new_tokens": 12,
            "top_logits_num": 10,
        },
        "distillation": {"kd_ratio": 0.1, "max_seq_length": 512, "distillation_type": "forward_kld"},
        "models": {
            "teacher": "teacher/Qwen/Qwen2.5-7B-Instruct/",
            "student": "student/Qwen/Qwen2.5-0.5B-Instruct/",
        },
        "training": dict(TRAINING),
    }


def v1_black_box_api() -> dict:
    """configs/kd_black_box_api.json of v1, as shipped."""
    return {
        "job_type": "kd_black_box_api",
        "dataset": {
            "instruction_path": "data/alpaca_en_demo.json",
            "labeled_path": "data/alpaca_en_demo_labeled.json",
            "template": "./chat_template/chat_template_kd.jinja",
            "seed": 42,
        },
        "inference": {
            "base_url": "ENDPOINT",
            "api_key": "TOKEN",
            "stream": True,
            "system_prompt": "You are a helpful assistant.",
            "max_new_tokens": 512,
        },
        "models": {"student": "student/Qwen/Qwen2.5-0.5B-Instruct/"},
        "training": dict(TRAINING),
    }


def run_command(main, config: dict, capsys, name="config.json", extra=()) -> tuple[int, str, str]:
    Path(name).write_text(json.dumps(config, indent=2))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["--config", name, *extra])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture()
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[1])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- 1. templates


def test_v1_template_response_found_inside_the_full_text(tmp_path, tokenizer):
    template = tmp_path / "kd.jinja"
    template.write_text(V1_KD_TEMPLATE)
    # The answer repeats words of the prompt and of the template: only its own place may be labeled.
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "say assistant", "output": "assistant user"}]))
    (record,) = load_records(path)
    from easydistill.data.render import render_template

    prompt = render_template(record, template, with_output=False)
    full = render_template(record, template, with_output=True)
    assert not full.startswith(prompt), "the shape under test: v1's prompt is not a prefix of its full text"
    example = render_and_tokenize(record, tokenizer, template_path=template, max_length=256)
    assert example.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [t for t in example.labels if t != IGNORE_INDEX]
    assert _decode(tokenizer, labels) == "assistant user<|im_end|>-\n"
    masked = _decode(tokenizer, example.input_ids[: example.prompt_len])
    assert masked.endswith("<|im_end|>\n\n  <|im_start|>assistant\n") and "say assistant" in masked


def test_newline_after_the_role_is_prompt_not_response(tmp_path, tokenizer):
    template = tmp_path / "role.jinja"
    template.write_text(
        "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n<|im_start|>assistant' }}"
        "{%- if add_output %}{{ '\\n' + message['output'] + '<|im_end|>\\n' }}{% endif %}"
    )
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hello"}) + "\n")
    (record,) = load_records(path)
    example = render_and_tokenize(record, tokenizer, template_path=template, max_length=64)
    assert _decode(tokenizer, [t for t in example.labels if t != IGNORE_INDEX]) == "hello<|im_end|>\n"


def test_validate_shows_one_rendered_record(v1_folder, capsys):
    code, out, err = run_command(validate.main, v1_white_box(), capsys)
    assert code == 0, err
    assert "6 records of data/alpaca_en_demo.json render" in out
    assert (
        "prompt (masked): '<|im_start|>system\\nYou answer in few words.<|im_end|>\\n<|im_start|>user\\n"
        in out
    )
    assert "<|im_end|>\\n\\n  <|im_start|>assistant\\n'" in out  # the context training and generation use
    assert "response:        written by the teacher" in out
    assert "add_generation_prompt branch renders the prompt differently" in out
    assert "$.inference.trust_remote_code: not read (v1 passed it to vLLM)" in out


def test_template_problem_costs_seconds_not_a_teacher_pass(v1_folder, capsys, monkeypatch):
    """A record the template cannot render stops kd.train in preflight: no model loads, nothing is written."""
    records = json.loads(Path("data/alpaca_en_demo.json").read_text())
    records[4]["system"] = "Be terse."  # v1's template never reads message['system']: it would be dropped
    Path("data/alpaca_en_demo.json").write_text(json.dumps(records, indent=2))
    import easydistill.models

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was loaded before the template was checked")

    monkeypatch.setattr(easydistill.models, "load_causal_lm", no_weights)
    from easydistill.kd.train import main

    code, _, err = run_command(main, v1_white_box(), capsys)
    assert code == 2 and "Traceback" not in err
    assert "$.dataset.instruction_path: data/alpaca_en_demo.json:" in err and "(item 4)" in err
    assert "never reads message['system']" in err
    assert not Path("data/alpaca_en_demo_labeled.json").exists() and not Path("result").exists()


# ---------------------------------------------------------------- 1 + 6 + 7. v1's kd_white_box end to end


def test_v1_white_box_config_runs_unchanged(v1_folder, capsys):
    from easydistill.kd.train import main

    code, out, err = run_command(validate.main, v1_white_box(), capsys)
    assert code == 0, err
    assert (
        "logits:     Qwen2.5-7B-Instruct: store logits.json.store (written first by teacher/Qwen/Qwen2.5-7B-Instruct/)"
        in out
    )
    assert (
        "answers:    data/alpaca_en_demo_labeled.json (teacher/Qwen/Qwen2.5-7B-Instruct/ writes them first"
        in out
    )

    code, out, err = run_command(main, v1_white_box(), capsys)
    assert code == 0, err
    labeled = json.loads(Path("data/alpaca_en_demo_labeled.json").read_text())
    assert [r["instruction"] for r in labeled] == [r["instruction"] for r in load_prompts_json()]
    made_by = json.loads(Path("data/alpaca_en_demo_labeled.json.teacher.json").read_text())
    assert (
        made_by["teacher"].endswith("teacher")
        and made_by["template"] == "./chat_template/chat_template_kd.jinja"
    )
    assert not Path("logits.json").exists(), "a v1 logits_path names a file: the store goes beside it"
    assert Path("logits.json.store/index.json").is_file()
    log = json.loads(Path("result/trainer_state.json").read_text())["log_history"]
    assert log[0]["kd_loss"] > 0

    # Same answers, same teacher and template: reused. Another template: refused before anything loads.
    again = v1_white_box()
    again["training"]["output_dir"] = "./result2/"
    code, out, err = run_command(validate.main, again, capsys)
    assert code == 0, err
    assert "(reused, from data/alpaca_en_demo.json)" in out and "logits.json.store (complete)" in out
    Path("chat_template/chat_template_kd.jinja").write_text(V1_KD_TEMPLATE.replace("few words", "one word"))
    code, _, err = run_command(validate.main, again, capsys)
    assert code == 2
    assert (
        "$.dataset.labeled_path: 'data/alpaca_en_demo_labeled.json' holds answers made with another " in err
    )
    assert "template text" in err


def load_prompts_json() -> list[dict]:
    return json.loads(Path("data/alpaca_en_demo.json").read_text())


def test_teacher_answers_resume_after_an_interruption(v1_folder, monkeypatch):
    """Answers are kept a chunk at a time: a crash keeps the finished chunks, the next run writes the rest."""
    from easydistill.store import answers as generate
    from easydistill.store.answer_files import key_file, partial_folder

    raw = v1_white_box()
    raw["inference"]["batch_size"] = 2
    cfg = load_config(raw)
    asked: list[list[str]] = []
    crash_at = {"call": 2}

    def fake_answers(model, tokenizer, prompts, sampling, **options):
        asked.append(prompts)
        if len(asked) == crash_at["call"]:
            raise KeyboardInterrupt  # this chunk never finishes
        return [f"answer of {len(p)} characters" for p in prompts]

    monkeypatch.setattr(generate, "generate_texts", fake_answers)
    monkeypatch.setattr(generate, "ANSWER_CHUNK_BATCHES", 1)  # chunks of batch_size = 2 prompts
    target = Path("data/alpaca_en_demo_labeled.json")
    with pytest.raises(KeyboardInterrupt):
        generate.write_teacher_answers(cfg, log=lambda *a: None)
    assert not target.exists() and len(list(partial_folder(target).glob("chunk-*.jsonl"))) == 1

    crash_at["call"] = 0
    asked.clear()
    generate.write_teacher_answers(cfg, log=lambda *a: None)
    assert sum(len(p) for p in asked) == 4, "only the 4 prompts without an answer are asked again"
    records = json.loads(target.read_text())
    assert [r["instruction"] for r in records] == [r["instruction"] for r in load_prompts_json()]
    assert all(r["output"].startswith("answer ") for r in records)
    assert key_file(target).is_file() and not partial_folder(target).exists()


def test_partial_answers_of_another_template_start_again(v1_folder):
    from easydistill.store.answer_files import AnswerChunks, answers_key

    cfg = load_config(v1_white_box())
    target = Path("data/alpaca_en_demo_labeled.json")
    chunks = AnswerChunks(target, answers_key(cfg), log=lambda *a: None)
    chunks.add([("0", "old answer")])
    assert AnswerChunks(target, answers_key(cfg), log=lambda *a: None).done("0")
    Path("chat_template/chat_template_kd.jinja").write_text(V1_KD_TEMPLATE + "\n")
    notes = []
    assert not AnswerChunks(target, answers_key(cfg), log=notes.append).done("0")
    assert "starting again" in notes[0]


def test_labeled_file_of_the_users_own_is_read_as_it_is(v1_folder, capsys):
    Path("data/alpaca_en_demo_labeled.json").write_text(json.dumps(make_records("add", 6, seed=3)))
    code, out, err = run_command(validate.main, v1_white_box(), capsys)
    assert code == 0, err
    assert "was not written by easydistill: training reads it as it is" in out


# ---------------------------------------------------------------- 2. kd_black_box_api


def test_black_box_api_with_answers_trains_on_them(v1_folder, capsys):
    Path("data/alpaca_en_demo_labeled.json").write_text(json.dumps(make_records("add", 6, seed=3)))
    from easydistill.kd.train import main

    code, out, err = run_command(main, v1_black_box_api(), capsys)
    assert code == 0, err
    assert "kd_black_box_api trains on the answers already in dataset.labeled_path" in out
    assert (
        "inference.base_url, inference.api_key, inference.stream, inference.system_prompt are unused" in out
    )
    log = json.loads(Path("result/trainer_state.json").read_text())["log_history"]
    assert log[0]["ce_loss"] > 0 and "kd_loss" not in log[0]


def test_black_box_api_with_prompts_only_names_the_keys_to_change(v1_folder, capsys):
    raw = v1_black_box_api()
    del raw["dataset"]["labeled_path"]
    code, out, err = run_command(validate.main, raw, capsys)
    assert code == 2 and out == ""
    assert 'set job_type to "kd_black_box_local" and models.teacher' in err and "dataset.labeled_path" in err
    code, _, err = run_command(validate.main, v1_black_box_api(), capsys)  # labeled_path named, file missing
    assert code == 2 and "no such file 'data/alpaca_en_demo_labeled.json' (kd_black_box_api" in err


# ---------------------------------------------------------------- 3. a v1 checkout's easydistill/ folder


@pytest.fixture()
def v1_checkout(v1_folder) -> Path:
    """v1's own package in the working folder, as a v1 checkout has it."""
    package = v1_folder / "easydistill"
    (package / "kd").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("def main():\n    print('EasyDistill v1')\n")
    (package / "kd/__init__.py").write_text("")
    (package / "kd/train.py").write_text("import trl\n")
    return v1_folder


def test_shadowed_package_is_an_exit_2_with_what_to_do(v1_checkout):
    """`python -m easydistill.validate` inside a v1 checkout: `easydistill` is v1's, our module is found by
    name the way an editable install's finder finds it. Without the guard: ImportError on config_parser."""
    ours = str(Path(easydistill.__file__).parent)
    program = f"""
import runpy, sys
from importlib.machinery import PathFinder
sys.path.insert(0, {str(v1_checkout)!r})  # what python -m does with the working folder

class EditableFinder:  # setuptools' editable finder: the package's direct children, by name
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        parent, _, _ = name.rpartition(".")
        return PathFinder.find_spec(name, [{ours!r}]) if parent == "easydistill" else None

sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableFinder)  # before an installed one
sys.argv = ["validate", "--config", "config.json"]
runpy.run_module("easydistill.validate", run_name="__main__")
"""
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=v1_checkout, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"`import easydistill` found {v1_checkout / 'easydistill'}, not this easydistill" in proc.stderr
    assert "easydistill --config FILE" in proc.stderr


def test_easydistill_command_runs_from_inside_a_v1_checkout(v1_checkout, tmp_path_factory):
    """v1's own command line, `easydistill --config FILE`, from the checkout: the console script finds this
    package (its folder, not the working folder, leads Python's path)."""
    Path("data/alpaca_en_demo_labeled.json").write_text(json.dumps(make_records("add", 6, seed=3)))
    Path("kd_black_box_api.json").write_text(json.dumps(v1_black_box_api()))
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "easydistill"  # what pip writes for [project.scripts] easydistill
    script.write_text("import sys\nfrom easydistill.__main__ import console\nsys.exit(console())\n")
    proc = subprocess.run(
        [sys.executable, str(script), "--config", "kd_black_box_api.json"],
        capture_output=True,
        text=True,
        cwd=v1_checkout,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (v1_checkout / "result/model.safetensors").is_file()
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["easydistill"] == "easydistill.__main__:console"


# ---------------------------------------------------------------- 4. teacher folders


def test_missing_teacher_folder_of_black_box_local_fails_validate(v1_folder, capsys):
    raw = v1_black_box_api()
    raw["job_type"] = "kd_black_box_local"
    raw["inference"] = {"seed": 777, "temperature": 0.8, "max_new_tokens": 512}
    raw["models"]["teacher"] = "teacher/Qwen/Qwen2.5-72B-Instruct/"  # not there
    code, _, err = run_command(validate.main, raw, capsys)
    assert code == 2
    assert "$.models.teacher: 'teacher/Qwen/Qwen2.5-72B-Instruct/' is not a model folder" in err
    assert "must write the answers to 'data/alpaca_en_demo.json'" in err
    raw["models"]["teacher"] = "teacher/Qwen/Qwen2.5-7B-Instruct/"
    code, out, err = run_command(validate.main, raw, capsys)
    assert code == 0, err
    assert "teacher:    teacher/Qwen/Qwen2.5-7B-Instruct/ (its answers only: black box)" in out


def test_missing_teacher_folder_for_a_store_to_compute(v1_folder, capsys):
    raw = v1_white_box()
    Path("data/alpaca_en_demo_labeled.json").write_text(json.dumps(make_records("add", 6, seed=3)))
    raw["models"]["teacher"] = "teacher/gone/"
    code, _, err = run_command(validate.main, raw, capsys)
    assert code == 2
    assert "no stored teacher logits (no v1 logits file 'logits.json' either) at 'logits.json.store'" in err
    assert "'teacher/gone/' is not a model folder to compute them from" in err


def test_logits_path_names(tmp_path):
    from easydistill.store.topk import store_location

    (tmp_path / "old.json").mkdir()  # a store an earlier version wrote at a file-like name: still read
    (tmp_path / "v1.jsonl").write_text("[]\n")
    raw = {
        "job_type": "kd_black_box_train_only",
        "models": {"student": "s"},
        "training": {"output_dir": "o"},
        "dataset": {"labeled_path": "d.json"},
    }
    cfg = load_config(raw)

    class Spec:
        def __init__(self, path):
            self.logits_path = str(tmp_path / path)

    expected = {
        "logits.json": ("logits.json.store", None),
        "x.jsonl": ("x.jsonl.store", None),
        "v1.jsonl": ("v1.jsonl.store", "v1.jsonl"),
        "old.json": ("old.json", None),
        "store": ("store", None),
    }
    for given, (store, v1_file) in expected.items():
        found = store_location(cfg, Spec(given))
        assert found == (tmp_path / store, tmp_path / v1_file if v1_file else None), given


# ---------------------------------------------------------------- 5. several teachers and the loss knobs


def test_v1_logits_lists_sum_the_teachers(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    base = {
        "models": {"student": str(student)},
        "training": {"output_dir": "o"},
        "job_type": "kd_white_box_train_only_multi",
    }
    v1 = load_config(
        {
            **base,
            "models": {"student": str(student), "teacher": [str(teacher)] * 2},
            "dataset": {"logits_path": ["a.jsonl", "b.jsonl"], "labeled_path": "d.json"},
        }
    )
    assert v1.distillation.combine == v1.loss.combine == "sum"  # the spec the trainer reads
    assert any('summed as in EasyDistill v1 ("sum")' in w for w in v1.warnings)
    folders = load_config(
        {
            **base,
            "models": {"student": str(student), "teacher": [str(teacher)] * 2},
            "dataset": {"labeled_path": "d.json"},
        }
    )
    assert folders.distillation.combine == "weighted_loss"
    assert any('set distillation.combine to "sum"' in w for w in folders.warnings)
    objects = [{"path": str(teacher), "name": "a"}, {"path": str(teacher), "name": "b"}]
    ours = load_config(
        {
            **base,
            "models": {"student": str(student), "teacher": objects},
            "dataset": {"labeled_path": "d.json"},
        }
    )
    assert ours.distillation.combine == "weighted_loss" and ours.warnings == []
    said = load_config(
        {
            **base,
            "models": {"student": str(student), "teacher": [str(teacher)] * 2},
            "dataset": {"logits_path": ["a.jsonl", "b.jsonl"], "labeled_path": "d.json"},
            "distillation": {"combine": "mixture"},
        }
    )
    assert said.distillation.combine == "mixture" and said.warnings == []


def test_ms_swift_style_beta_warns(tiny_pair, tmp_path):
    """Self-distillation as an ms-swift user writes it: beta set, no distillation_type."""
    raw = kd_config(tiny_pair, tmp_path / "d.jsonl", tmp_path / "out", distillation={"beta": 0.5})
    del raw["distillation"]["distillation_type"]
    raw["models"]["teacher"] = "self"
    warnings = load_config(raw).warnings
    assert any(
        '$.distillation.beta: read only by distillation_type "jsd"; this run trains forward_kld (the default)'
        in w
        for w in warnings
    )
    raw["distillation"]["distillation_type"] = "jsd"
    assert not any("beta" in w for w in load_config(raw).warnings)


def test_tiny_negative_divergences_log_as_zero():
    from easydistill.train.trainer import divergence_for_log

    for tiny in (-3e-9, -0.0, -4e-7):
        value = divergence_for_log(tiny)
        assert value == 0.0 and math.copysign(1.0, value) == 1.0, "logged as 0, never -0"
    assert divergence_for_log(-0.25) == -0.25, "a real negative divergence is a bug and stays visible"
    assert divergence_for_log(0.1234567) == 0.123457


# ---------------------------------------------------------------- 8. the small ones


def test_unsupported_v1_jobs_say_so(tiny_pair, tmp_path):
    for job, reason in (
        ("mmkd_white_box", "multimodal distillation is not supported"),
        ("cot_generation_api", "EasyDistill v1's data synthesis"),
    ):
        with pytest.raises(UserError) as info:
            load_config({"job_type": job, "models": {"student": "s"}, "training": {"output_dir": "o"}})
        assert f"$.job_type: {job!r} is an EasyDistill v1 job: {reason}" in str(info.value)
        assert "did you mean" not in str(info.value) and len(info.value.problems) == 1


def test_sequence_limit_above_the_models_positions(v1_folder, capsys):
    Path("data/alpaca_en_demo_labeled.json").write_text(json.dumps(make_records("add", 6, seed=3)))
    raw = v1_black_box_api()
    raw["training"]["max_length"] = 4096
    code, _, err = run_command(validate.main, raw, capsys)
    assert code == 2
    assert (
        "$.distillation.max_seq_length: 4096 tokens exceed the 1024 positions of 'student/Qwen/Qwen2.5-0.5B-Instruct/'"
        in err
    )


def test_merge_onto_the_wrong_base_is_an_exit_2(tiny_pair, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from easydistill import merge

    teacher, student = tiny_pair
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit) as info:
        cli.run(
            merge.main,
            [
                "--base",
                str(teacher),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ],
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"the adapter {tmp_path / 'adapter'} does not fit the base model {teacher}" in err
    assert "size mismatch" in err and str(student) in err
    assert not (tmp_path / "merged").exists()


def test_report_to_tensorboard_installs_from_an_extra_and_logs(tiny_pair, tmp_path):
    import tomllib
    from kd_helpers import train, write_records

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("tensorboard==") for d in extras["tensorboard"])
    data = write_records(tmp_path / "train.jsonl", n=4)
    train(
        kd_config(tiny_pair, data, tmp_path / "out", training={"max_steps": 1, "report_to": ["tensorboard"]})
    )
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))
