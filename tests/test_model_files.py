"""What preflight reads from model folders without torch: tokenizer vocabularies, module names from
safetensors headers; and `validate` importing neither torch nor transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, write_records

from easydistill.model_files import (
    matches,
    model_config,
    module_names,
    parameter_shapes,
    same_tokenizer_files,
    tokenizer_vocab,
)

REPO = Path(__file__).resolve().parents[1]


def linear_modules_of(folder: Path) -> set[str]:
    """The truth: names of the nn.Linear modules of the model transformers builds from the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_module_names_from_the_header_are_the_models_linear_layers(tiny_pair, tiny_llama_pair):
    for folder in (*tiny_pair, *tiny_llama_pair):
        linear, every = module_names(parameter_shapes(folder), model_config(folder))
        assert set(linear) == linear_modules_of(folder)
        assert "model.embed_tokens" in every and "model.embed_tokens" not in linear


def test_sharded_and_tied_checkpoints(tmp_path):
    from examples.tiny_models import build_model

    folder = build_model(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in parameter_shapes(folder)  # a tied head is not saved
    linear, _ = module_names(parameter_shapes(folder), model_config(folder))
    assert set(linear) == linear_modules_of(folder)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    shutil.copy(folder / "config.json", sharded / "config.json")
    assert (sharded / "model.safetensors.index.json").is_file() and not (
        sharded / "model.safetensors"
    ).exists()
    assert parameter_shapes(sharded) == parameter_shapes(folder)


def test_peft_suffix_rule():
    assert matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj")
    assert not matches("model.layers.0.self_attn.q_proj", "_proj")


def test_tokenizer_vocab_equals_autotokenizer(tiny_pair, mismatched_tokenizer_model):
    from transformers import AutoTokenizer

    for folder in (tiny_pair[1], mismatched_tokenizer_model):
        assert tokenizer_vocab(folder) == AutoTokenizer.from_pretrained(folder).get_vocab()
    assert same_tokenizer_files(*tiny_pair)
    assert not same_tokenizer_files(tiny_pair[1], mismatched_tokenizer_model)


def test_added_token_in_the_config_only_makes_another_vocabulary(tiny_pair, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair[0], teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config.setdefault("added_tokens_decoder", {})["4000"] = {"content": "<extra>", "special": True}
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_vocab(teacher)["<extra>"] == 4000
    assert tokenizer_vocab(teacher) != tokenizer_vocab(tiny_pair[1])


def _validate(raw: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return subprocess.run(
        [sys.executable, *extra, "-m", "easydistill.validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("teacher", ["online", "self"])
def test_validate_imports_neither_torch_nor_transformers(teacher, tiny_pair, tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=4)
    raw = kd_config(tiny_pair, data, tmp_path / "out", lora={"target_modules": "all-linear"})
    if teacher == "self":
        raw["models"]["teacher"] = "self"
    proc = _validate(raw, tmp_path, "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    assert "q_proj" in proc.stdout  # the LoRA targets were read
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "easydistill.preflight" in imported and "tokenizers" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "peft", "numpy"))
    assert heavy == []


def test_broken_tokenizer_and_missing_weights_are_user_errors(tiny_pair, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_pair[1], student)
    (student / "tokenizer.json").write_text('{"model": ')
    (student / "model.safetensors").unlink()
    data = write_records(tmp_path / "train.jsonl", n=4)
    raw = kd_config((tiny_pair[0], student), data, tmp_path / "out")
    proc = _validate(raw, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "$.models.student: cannot load the tokenizer" in proc.stderr
    assert "holds no model.safetensors" in proc.stderr
