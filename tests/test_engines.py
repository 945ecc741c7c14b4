"""Several ranks under a sharding engine: DeepSpeed ZeRO-3 (real DeepSpeed on its CPU accelerator) and FSDP2
(accelerate's, on gloo through the test-only switch), each against one process with the doubled batch.

One launch checks several properties at once (weights, exports, the start line, engine.json, each rank's
parameter bytes): a two-rank launch costs ~40 s here. The default suite runs one ZeRO-3 and one FSDP2 case
chosen to cover the hard paths (ZeRO-3: full fine-tuning with the fused loss, whose head gradient meets a
partitioned weight; FSDP2: LoRA with a self-teacher and a sharded online teacher, fused); the rest of the
matrix (full / LoRA x online / self x plain / fused) and checkpoint + resume are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, launch_two_ranks, load_adapter_weights, max_abs_diff, train, write_records

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]'; make test installs it)",
)
SGD = {"optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant"}
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("engines") / "train.jsonl", n=8)


def _config(tiny_pair, data, out, *, lora: bool, teachers: str, chunk: int, ranks: int, **training):
    teacher = {"online": str(tiny_pair[0]), "self+online": ["self", str(tiny_pair[0])]}[teachers]
    batch = {"per_device_train_batch_size": 4} if ranks == 1 else {}
    return kd_config(
        tiny_pair,
        data,
        out,
        training={**SGD, "max_steps": 2, **batch, **training},
        distillation={"chunk_size": chunk, "distillation_type": "jsd"},
        models={"teacher": teacher},
        lora={"enable": lora, "save_merged_model": lora},
    )


def _state(folder: Path, lora: bool) -> dict[str, torch.Tensor]:
    """The exported weights, loaded the way a user would: stock from_pretrained (+ PEFT for an adapter)."""
    from transformers import AutoModelForCausalLM

    if lora:
        model = AutoModelForCausalLM.from_pretrained(folder / "merged_model", dtype=torch.float32)
        assert load_adapter_weights(folder)  # the adapter itself is there too
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_equivalence(tiny_pair, data, tmp_path, engine: str, *, lora: bool, teachers: str, chunk: int):
    """Two ranks x batch 1 x accumulation 2, two SGD steps, equal one process x batch 4: weights, the stock
    exports, where every model lives, and each rank's share of the parameter bytes."""
    common = dict(lora=lora, teachers=teachers, chunk=chunk)
    train(_config(tiny_pair, data, tmp_path / "one", ranks=1, **common))
    two = _config(
        tiny_pair,
        data,
        tmp_path / "two",
        ranks=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        **common,
    )
    proc = launch_two_ranks(two, tmp_path / "two.json", engine)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one_state, two_state = _state(tmp_path / "one", lora), _state(tmp_path / "two", lora)
    before = _state(tiny_pair[1], lora=False)
    assert max_abs_diff(before, one_state) > 1e-3  # the step did move the weights
    assert max_abs_diff(one_state, two_state) <= TOLERANCE
    if lora:
        one, two_adapter = load_adapter_weights(tmp_path / "one"), load_adapter_weights(tmp_path / "two")
        assert max_abs_diff(one, two_adapter) <= TOLERANCE

    # No silent fallback: the start line and engine.json say what ran, and where.
    facts = json.loads((tmp_path / "two/engine.json").read_text())
    assert facts["name"] == engine and facts["world_size"] == 2
    assert facts["student"].startswith("sharded")
    assert facts["teachers"]["teacher"].startswith("sharded")
    assert [line for line in proc.stdout.splitlines() if line.startswith(f"engine: {engine} on 2 ranks")]
    path = "loss: fused chunked path" if chunk else "loss: plain path"
    assert [line for line in proc.stdout.splitlines() if line.startswith(path)]  # the path asked for ran
    assert json.loads((tmp_path / "two/metrics.json").read_text())["engine"] == engine

    # The sharding is real: each rank holds about half of one process's parameter bytes, per model.
    whole = json.loads((tmp_path / "one/engine.json").read_text())["parameter_bytes_per_rank"]
    shares = facts["parameter_bytes_per_rank"]
    for name in ("student", "teacher"):
        assert len(shares[name]) == 2
        for rank_bytes in shares[name]:
            assert 0.4 < rank_bytes / whole[name][0] < 0.6, (name, rank_bytes, whole[name])


# ---------------------------------------------------------------- the default suite: one case per engine


@needs_deepspeed
@pytest.mark.multiproc
def test_zero3_full_fused_equals_one_process(tiny_pair, data, tmp_path):
    _check_equivalence(tiny_pair, data, tmp_path, "zero3", lora=False, teachers="online", chunk=5)


@pytest.mark.multiproc
def test_fsdp2_lora_self_and_online_fused_equals_one_process(tiny_pair, data, tmp_path):
    _check_equivalence(tiny_pair, data, tmp_path, "fsdp2", lora=True, teachers="self+online", chunk=5)


# ---------------------------------------------------------------- the rest of the matrix


MATRIX = [
    pytest.param(engine, lora, teachers, chunk, marks=[pytest.mark.slow, pytest.mark.multiproc, *marks])
    for engine, marks in (("zero3", [needs_deepspeed]), ("fsdp2", []))
    for lora, teachers in ((False, "online"), (True, "self+online"))
    for chunk in (0, 5)
    if (engine, lora, chunk) not in (("zero3", False, 5), ("fsdp2", True, 5))  # in the default suite
]


@pytest.mark.parametrize("engine,lora,teachers,chunk", MATRIX)
def test_engine_matrix_equals_one_process(tiny_pair, data, tmp_path, engine, lora, teachers, chunk):
    _check_equivalence(tiny_pair, data, tmp_path, engine, lora=lora, teachers=teachers, chunk=chunk)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_resume_equals_uninterrupted(tiny_pair, data, tmp_path):
    """AdamW (optimizer and scheduler state in DeepSpeed's sharded checkpoint): 2 steps straight equal 1 step,
    a checkpoint, and a resumed second step."""
    adam = {
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": 1,
        "per_device_train_batch_size": 2,
    }
    common = dict(lora=True, teachers="self+online", chunk=5, ranks=2)
    straight = _config(tiny_pair, data, tmp_path / "straight", **common, **adam, optim="adamw_torch")
    proc = launch_two_ranks(straight, tmp_path / "straight.json", "zero3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoint = tmp_path / "straight/checkpoint-1"
    assert (checkpoint / "latest").is_file()  # DeepSpeed's own sharded checkpoint folder
    resumed = _config(
        tiny_pair,
        data,
        tmp_path / "resumed",
        **common,
        **adam,
        optim="adamw_torch",
        resume_from_checkpoint=str(checkpoint),
    )
    proc = launch_two_ranks(resumed, tmp_path / "resumed.json", "zero3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_adapter_weights(tmp_path / "straight"), load_adapter_weights(tmp_path / "resumed")
    first = load_adapter_weights(checkpoint)
    assert max_abs_diff(first, a) > 1e-4  # the second step moved the weights
    assert max_abs_diff(a, b) <= TOLERANCE


# ---------------------------------------------------------------- no silent fallback, in one process


def _exit_code(raw: dict, path: Path, capsys) -> tuple[int, str]:
    from easydistill.cli import run
    from easydistill.kd.train import main

    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as stop:
        run(main, ["--config", str(path)])
    return stop.value.code, capsys.readouterr().err


def test_fsdp_asked_on_a_cpu_host_is_an_error(tiny_pair, data, tmp_path, monkeypatch, capsys):
    """accelerate runs FSDP on GPU-like devices only: asking for it here must not quietly train with DDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("EASYDISTILL_TEST_FSDP_ON_CPU", raising=False)
    raw = _config(tiny_pair, data, tmp_path / "out", lora=True, teachers="online", chunk=0, ranks=1)
    code, err = _exit_code(raw, tmp_path / "fsdp.json", capsys)
    assert code == 2
    assert "FSDP is asked for" in err and "silently be DDP" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_sharded_teacher_needs_a_sharding_engine(tiny_pair, data, tmp_path, capsys):
    raw = _config(tiny_pair, data, tmp_path / "out", lora=True, teachers="online", chunk=0, ranks=1)
    raw["models"]["teacher_placement"] = "sharded"
    code, err = _exit_code(raw, tmp_path / "sharded.json", capsys)
    assert code == 2
    assert "$.models.teacher_placement" in err and "ZeRO-3 or FSDP2" in err and "single" in err


def test_one_process_says_where_everything_lives(tiny_pair, data, tmp_path):
    out = tmp_path / "out"
    train(_config(tiny_pair, data, out, lora=True, teachers="self+online", chunk=0, ranks=1, max_steps=1))
    facts = json.loads((out / "engine.json").read_text())
    assert facts["name"] == "single" and facts["world_size"] == 1
    assert facts["teachers"] == {"self": "self (the student's weights, replicated)", "teacher": "replicated"}
    assert set(facts["parameter_bytes_per_rank"]) == {"student", "teacher"}


def test_an_fsdp_wrapped_linear_is_a_plain_head():
    """fully_shard swaps a Linear's class for a subclass that keeps Linear's forward: the fused loss must
    still apply it by hand (else it calls the sharded module once per chunk: one all-gather per chunk)."""
    from torch.distributed.fsdp import FSDPModule

    from easydistill.loss.head import plain_linear

    wrapped = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
    head = torch.nn.Linear(4, 3)
    head.__class__ = wrapped
    assert plain_linear(torch.nn.Linear(4, 3)) and plain_linear(head)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not plain_linear(Scaled(4, 3)) and not plain_linear(torch.nn.Embedding(3, 4))


ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_show_their_launch_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    header = path.read_text().split("compute_environment")[0]
    assert f"accelerate launch --config_file configs/accelerate/{path.name} -m easydistill.kd.train" in header
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
    assert str(config.distributed_type).split(".")[-1] == expected[path.stem.split("_")[0]]
