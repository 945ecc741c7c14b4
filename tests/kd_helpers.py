"""Small builders shared by the training tests: a config dict on tiny models, and a run in-process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from easydistill.config import KDLoss, load_config
from examples.synthetic import make_records


def write_records(path: Path, task: str = "add", n: int = 24, seed: int = 1) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(task, n, seed=seed)))
    return path


def loss_spec(**overrides) -> KDLoss:
    """A KDLoss with the schema's defaults (forward KL, kd_ratio 0.5, the plain path), some replaced."""
    values = dict(
        kd_ratio=0.5,
        kind="forward_kld",
        beta=0.5,
        skew_alpha=0.1,
        combine="weighted_loss",
        temperature=1.0,
        chunk_size=0,
    )
    return KDLoss(**{**values, **overrides})


def kd_config(tiny_pair, data: Path, out: Path, **blocks) -> dict:
    """A white-box config on the tiny pair; `blocks` are merged into the named blocks (lora, training...)."""
    teacher, student = tiny_pair
    cfg = {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": str(data), "seed": 0},
        "distillation": {"kd_ratio": 0.5, "max_seq_length": 64, "distillation_type": "forward_kld"},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {
            "output_dir": str(out),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
            "seed": 0,
        },
        "lora": {"enable": True, "r": 4, "alpha": 8, "dropout": 0.0},
    }
    for block, values in blocks.items():
        if isinstance(values, dict):
            cfg.setdefault(block, {}).update(copy.deepcopy(values))
        else:
            cfg[block] = values
    return cfg


def prepare(raw: dict):
    from easydistill.train.trainer import prepare_run

    return prepare_run(load_config(raw))


def train(raw: dict) -> dict:
    from easydistill.train.trainer import run_training

    return run_training(load_config(raw))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def load_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous (fixed ports collide
    with a previous run's sockets in TIME_WAIT, or with another test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_ranks(config: dict, path: Path):
    """Write `config` to `path` and run kd.train on two gloo ranks (torchrun, one thread each)."""
    import os
    import subprocess
    import sys

    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "easydistill.kd.train", "--config", str(path)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )


# How `accelerate launch` is told each engine: the shipped files of configs/accelerate/ (their process count
# and mixed precision overridden on the command line).
ENGINE_FLAGS = {
    "zero3": ["--config_file", "configs/accelerate/zero3.yaml"],
    "zero2": ["--config_file", "configs/accelerate/zero2.yaml"],
    "fsdp2": ["--config_file", "configs/accelerate/fsdp2.yaml"],
}


def launch_two_ranks(config: dict, path: Path, engine: str, *extra: str, env: dict | None = None):
    """Write `config` to `path` and run kd.train through `accelerate launch` on two gloo ranks under `engine`
    (DeepSpeed on its CPU accelerator; FSDP2 through the test-only switch, accelerate having no CPU FSDP)."""
    import os
    import subprocess
    import sys

    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", *ENGINE_FLAGS[engine], *extra]
    command += [
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    command += ["--main_process_port", str(free_port()), "-m", "easydistill.kd.train", "--config", str(path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    if engine.startswith("fsdp"):
        environment["EASYDISTILL_TEST_FSDP_ON_CPU"] = "1"
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=Path(__file__).resolve().parents[1],
    )
