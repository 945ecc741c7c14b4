"""easydistill.plan: parameter counts from config.json, the activation model, and the plan against a real step."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from easydistill import memory_measure, memory_plan, plan
from easydistill.cli import run
from easydistill.config import load_config
from examples import tiny_models


def test_parameter_counts_from_config_match_the_loaded_models(tiny_pair):
    for path in tiny_pair:
        model = AutoModelForCausalLM.from_pretrained(path)
        arch = memory_plan.read_arch(str(path))
        assert arch.params == sum(p.numel() for p in model.parameters())
        assert arch.vocab == model.get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_parameter_count_matches_peft(tiny_pair, targets):
    from peft import LoraConfig, get_peft_model

    student = tiny_pair[1]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = load_config(
        {
            "job_type": "kd_black_box_train_only",
            "dataset": {"labeled_path": "x.jsonl"},
            "models": {"student": str(student)},
            "training": {"output_dir": "o"},
            "lora": {"enable": True, "r": 4, "target_modules": targets},
        }
    ).lora
    assert memory_plan.lora_params(memory_plan.read_arch(str(student)), lora) == trainable


def test_activation_model_matches_what_autograd_saves(tiny_pair):
    """Every tensor autograd keeps for backward in a student forward (weights excluded), against the model."""
    student = tiny_pair[1]
    model = AutoModelForCausalLM.from_pretrained(student)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    batch, seq = 2, 24
    ids = torch.randint(3, 200, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -5:] = 0  # padding: the mask is built and the KV heads are repeated, as the plan assumes
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    estimate, _ = memory_plan.activation_bytes(
        memory_plan.read_arch(str(student)), memory_plan.Sizes(batch, seq, 0), 4, False
    )
    assert estimate == pytest.approx(sum(saved.values()), rel=0.06)


@pytest.fixture(scope="module")
def big_vocab_run(tmp_path_factory):
    """A student and teacher with 32k logits columns, 4 x 128-token sequences that are almost all response:
    the logits terms (tens of MB each) dominate what the process holds besides."""
    root = tmp_path_factory.mktemp("plan")
    tokenizer = tiny_models.build_tokenizer()
    student = tiny_models.build_model(
        root / "student", tokenizer=tokenizer, padded_vocab=32000, seed=1, **tiny_models.STUDENT
    )
    teacher = tiny_models.build_model(
        root / "teacher", tokenizer=tokenizer, padded_vocab=32000, seed=2, **tiny_models.TEACHER
    )
    records = [
        {"instruction": "copy: " + "abcdefgh"[i % 8], "output": ("abcdefgh" * 20)[i % 8 :][:130]}
        for i in range(8)
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": str(data)},
        # the plain path, whose (N x V) logits terms this fixture is built to make dominant
        "distillation": {"kd_ratio": 0.5, "max_seq_length": 128, "chunk_size": 0},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {
            "output_dir": str(root / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
        },
    }
    path = root / "cfg.json"
    path.write_text(json.dumps(raw))
    return path


def test_plan_is_within_30_percent_of_the_measured_peak(big_vocab_run):
    estimate = memory_plan.make_plan(load_config(str(big_vocab_run)))
    logits = sum(t.bytes for t in estimate.terms if t.owner == "loss")
    assert logits > 0.7 * estimate.peak  # the test measures the accounting, not the process's noise
    measured = memory_measure.measure(big_vocab_run, steps=2)
    ratio = estimate.peak / measured["tensor_peak_bytes"]
    # The plan counts every position as a label (508 rows); the data has 4 x 116: an upper bound by 1.09
    assert 0.7 <= ratio <= 1.3, (ratio, estimate.table(), measured)
    assert measured["peak_rss_bytes"] > measured["tensor_peak_bytes"]


def test_plan_command_prints_the_table_and_writes_json(big_vocab_run, tmp_path, capsys):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as info:
        run(plan.main, ["--config", str(big_vocab_run), "--json", str(out)])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "PEAK per device" in printed and "assumes:" in printed
    saved = json.loads(out.read_text())
    assert saved["peak_bytes"] > 0 and {t["owner"] for t in saved["terms"]} >= {"student", "teacher", "loss"}
    with pytest.raises(SystemExit) as info:
        run(plan.main, ["--config", str(tmp_path / "missing.json")])
    assert info.value.code == 2


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]')",
)
def test_plan_per_device_under_zero3_is_within_30_percent_of_a_rank(big_vocab_run):
    """Two ranks under DeepSpeed ZeRO-3 (CPU accelerator): the per-device plan against the largest rank."""
    from easydistill.config import load_config
    from easydistill.memory_sharding import EngineSpec, measure_on_ranks, per_device

    cfg = load_config(str(big_vocab_run))
    spec = EngineSpec("zero3", 2)
    teachers = {s.name: memory_plan.read_arch(s.path) for s in cfg.teachers if s.kind == "online"}
    device = per_device(memory_plan.make_plan(cfg), spec, memory_plan.read_arch(cfg.models.student), teachers)
    measured = measure_on_ranks(big_vocab_run, 2, spec)
    assert len(measured["ranks"]) == 2
    # Each rank starts with about half of the weights one process holds: the partitions are real.
    from easydistill.memory_measure import measure

    whole = measure(big_vocab_run, steps=1)["weights_and_buffers_bytes"]
    assert all(0.35 < r["weights_and_buffers_bytes"] / whole < 0.65 for r in measured["ranks"])
    ratio = device.peak / measured["engine_peak_bytes"]
    assert 0.7 <= ratio <= 1.3, (ratio, device.table(), measured)


def test_per_device_shares_follow_the_engine(tiny_pair, tmp_path):
    """DDP keeps everything whole; ZeRO-2 splits gradients and optimizer; ZeRO-3 also the weights of the
    student and of a sharded teacher; offload moves the shares off the device; a self-teacher adds nothing."""
    from kd_helpers import kd_config, write_records

    from easydistill.memory_sharding import EngineSpec, per_device

    data = write_records(tmp_path / "d.jsonl", n=4)
    cfg = load_config(kd_config(tiny_pair, data, tmp_path / "o", lora={"enable": False}))
    student, teacher = (memory_plan.read_arch(str(p)) for p in (tiny_pair[1], tiny_pair[0]))
    one = memory_plan.make_plan(cfg)

    def terms(name, **kw):
        device = per_device(one, EngineSpec(name, 4, **kw), student, {"teacher": teacher})
        return device, {(t.owner, t.what.split(",")[0].split(" (")[0]): t.bytes for t in device.terms}

    ddp, d = terms("ddp")
    z2, t2 = terms("zero2")
    z3, t3 = terms("zero3")
    off, to = terms("zero3", offload_params=True, offload_optimizer=True)
    assert d[("student", "weights")] == student.params * 4 == t2[("student", "weights")]
    assert t2[("student", "gradients")] == d[("student", "gradients")] // 4
    assert t2[("student", "optimizer")] == 12 * student.params // 4  # fp32 master + m + v, split in 4
    assert t3[("student", "weights")] == student.params * 4 // 4
    assert (
        t3[("teacher", "weights")] == teacher.params * 4 // 4
        and d[("teacher", "weights")] == teacher.params * 4
    )
    assert to[("student", "weights")] == 0 and to[("student", "optimizer")] == 0 and off.cpu_bytes > 0
    assert off.peak < z3.peak < z2.peak <= ddp.peak
    assert ddp.peak == one.peak  # DDP is the one-device plan on every device
