"""Which loss path a run takes ("auto" chunk size, the start line), and what its logs say about time."""

from __future__ import annotations

import json

import pytest
import torch
from kd_helpers import kd_config, prepare, train, write_records

from easydistill.config.chunk_size import (
    ACCELERATOR_BUDGET,
    BUFFER_BUDGET,
    LARGEST,
    SMALLEST,
    auto_chunk_size,
)
from easydistill.train.step import choose_loss_path

SHAPES = [(v, h) for v in (285, 32_000, 151_936, 256_000) for h in (64, 128, 896, 3584, 8192)]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_auto_chunk_size_fits_the_budget(device):
    budget = BUFFER_BUDGET.get(device.split(":")[0], ACCELERATOR_BUDGET)
    for teachers in (0, 1, 3):
        for vocab, hidden in SHAPES:
            chunk = auto_chunk_size(vocab, hidden, device, teachers)
            assert SMALLEST <= chunk <= LARGEST and chunk & (chunk - 1) == 0
            assert chunk == SMALLEST or 4 * vocab * (5 + teachers) * chunk <= budget
            # a larger vocabulary never gets a larger chunk; a wider model never a smaller one
            assert auto_chunk_size(2 * vocab, hidden, device, teachers) <= chunk
            assert auto_chunk_size(vocab, 2 * hidden, device, teachers) >= chunk


def test_auto_chunk_size_on_known_shapes():
    # The benchmark's student (hidden 128) on a CPU: the knee of the measured sweep (docs/performance.md).
    assert auto_chunk_size(32_000, 128, "cpu") == 64
    assert auto_chunk_size(151_936, 128, "cpu") == 64
    assert auto_chunk_size(285, 64, "cpu") == 32
    # Qwen2.5-0.5B and a Llama-8B-sized head on a GPU: hundreds of rows per chunk.
    assert auto_chunk_size(151_936, 896, "cuda") == 256
    assert auto_chunk_size(128_256, 4096, "cuda") == 256
    assert auto_chunk_size(32_000, 4096, "cuda") == 1024
    # a small GPU gets a smaller budget
    assert auto_chunk_size(151_936, 896, "cuda", device_memory=8 * 2**30) == 128


@pytest.fixture(scope="module")
def student(tiny_pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair[1])


def test_start_line_says_which_path_and_why(student):
    chunk, line = choose_loss_path(0, student)
    assert chunk == 0 and line.startswith("loss: plain path (distillation.chunk_size is 0)")
    chunk, line = choose_loss_path(12, student)
    assert chunk == 12 and line == "loss: fused chunked path, chunk_size 12 (distillation.chunk_size)"
    chunk, line = choose_loss_path("auto", student, device=torch.device("cpu"))
    assert chunk == auto_chunk_size(student.config.vocab_size, student.config.hidden_size, "cpu", 0)
    assert line.startswith(f"loss: fused chunked path, chunk_size {chunk} (auto: vocabulary")


def test_logit_softcapping_takes_the_plain_path_and_says_so(student):
    student.config.final_logit_softcapping = 30.0
    try:
        chunk, line = choose_loss_path("auto", student)
    finally:
        student.config.final_logit_softcapping = None
    assert chunk == 0
    assert line.startswith("loss: plain path, not the fused one (") and "final_logit_softcapping=30.0" in line


def test_evaluation_takes_the_training_path_and_gives_the_same_loss(tiny_pair, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", n=16)
    losses = {}
    for chunk_size in (0, "auto"):
        raw = kd_config(
            tiny_pair,
            data,
            tmp_path / f"out{chunk_size}",
            dataset={"eval_ratio": 0.25},
            distillation={"chunk_size": chunk_size},
        )
        run = prepare(raw)
        losses[chunk_size] = run.trainer.evaluate()["eval_loss"]
    starts = [x for x in capsys.readouterr().out.splitlines() if x.startswith("loss: ")]
    assert starts[0].startswith("loss: plain path") and starts[1].startswith("loss: fused chunked path")
    assert losses["auto"] == pytest.approx(losses[0], rel=1e-5)


def test_time_split_and_tokens_per_second(tiny_pair, tmp_path):
    """One epoch, a log per step: tokens_per_second x step_seconds, summed, is every input token trained on;
    the parts of the split add up to no more than the step."""
    data = write_records(tmp_path / "train.jsonl", n=12)
    out = tmp_path / "out"
    raw = kd_config(tiny_pair, data, out, training={"max_steps": -1, "num_train_epochs": 1})
    run = prepare(raw)
    tokens = sum(len(e.input_ids) for e in run.train_examples)
    train(raw)
    log = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(log) == 3
    parts = ("teacher_forward", "student_forward", "loss", "student_backward", "other")
    for entry in log:
        assert all(entry[f"time/{p}"] >= 0 for p in parts) and "time/generation" not in entry
        assert entry["time/teacher_forward"] > 0 and entry["time/student_backward"] > 0
        assert sum(entry[f"time/{p}"] for p in parts) == pytest.approx(entry["step_seconds"], abs=1e-3)
    trained = sum(e["tokens_per_second"] * e["step_seconds"] for e in log)
    assert trained == pytest.approx(tokens, rel=0.01)
