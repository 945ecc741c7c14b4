"""The fused chunked KD path equals the plain full-logit path: values and gradients, every kind and combine."""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kd_helpers import loss_spec

from easydistill.loss.chunked import fused_head_loss
from easydistill.loss.combine import combined_divergence
from easydistill.loss.rows import SparseRows
from easydistill.models import hidden_at_labels, logits_at_labels
from easydistill.teachers import OnlineTeacher, SelfTeacher
from easydistill.train.step import kd_step, label_positions

V = 61  # the student's rows; teachers pad theirs further
KINDS = [
    ("forward_kld", 0.5, 0.1),
    ("reverse_kld", 0.5, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_forward_kld", 0.5, 0.2),
    ("skew_forward_kld", 0.5, 0.0),
    ("skew_reverse_kld", 0.5, 0.3),
    ("tvd", 0.5, 0.1),
]


def causal_lm(vocab: int, hidden: int, seed: int, arch: str = "qwen2", **extra):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def spec(name: str, weight: float = 1.0, temperature: float = 1.0):
    return SimpleNamespace(name=name, weight=weight, temperature=temperature, kind="online")


def online(vocab: int, hidden: int, seed: int, **spec_args) -> OnlineTeacher:
    model = causal_lm(vocab, hidden, seed).requires_grad_(False).eval()
    return OnlineTeacher(spec(f"t{seed}", **spec_args), model)


@pytest.fixture(scope="module")
def batch():
    """3 sequences: left prompts of different lengths, one right-padded, label positions in the middle."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 19), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -4:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, -4:] = -100
    labels[2, :11] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.fixture(scope="module")
def teachers():
    """Two teachers of other widths and paddings (V+13 and V+2 rows), weights 0.7 / 0.3, T = 1 and 2."""
    return [online(V + 13, 48, 1, weight=0.7), online(V + 2, 40, 2, weight=0.3, temperature=2.0)]


def reference_objective(model, batch, teachers, loss):
    """KDTrainer.compute_loss before chunking: full logits of every model, then CE + combined_divergence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask, targets = label_positions(batch["labels"])
    student = logits[:, :-1][mask]
    ce = F.cross_entropy(student.float(), targets, reduction="sum")
    kd = ce.new_zeros(())
    if teachers and loss.kd_ratio > 0:
        rows = [t.rows(batch, mask) for t in teachers]
        weights, temperatures = [t.spec.weight for t in teachers], [t.spec.temperature for t in teachers]
        kd, _ = combined_divergence(student, rows, weights, temperatures, targets, loss)
    return (1 - loss.kd_ratio) * ce + loss.kd_ratio * kd


def step(model, batch, teachers, loss, chunk_size):
    return kd_step(model, batch, teachers, replace(loss, chunk_size=chunk_size))


def value_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    value = compute()
    (value / 7).backward()  # as the trainer divides by the step's token count: backward must scale
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, candidate, rtol=5e-5):
    (ref_value, ref_grads), (value, grads) = reference, candidate
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, g in ref_grads.items():
        scale = float(g.abs().max()) + 1e-12
        assert float((grads[name] - g).abs().max()) / scale < 1e-4, name


def options(**overrides):
    return loss_spec(**{"kind": "jsd", **overrides})


# ---------------------------------------------------------------- fused == plain, on real models


@pytest.mark.parametrize("kind,beta,alpha", KINDS)
def test_fused_equals_full_logits_for_every_kind(batch, teachers, kind, beta, alpha):
    student = causal_lm(V, 32, 0)
    opts = options(kind=kind, beta=beta, skew_alpha=alpha)
    reference = value_and_grads(student, lambda: reference_objective(student, batch, teachers[:1], opts))
    for chunk_size in (0, 4):
        fused = value_and_grads(
            student,
            lambda c=chunk_size: step(student, batch, teachers[:1], opts, c).objective,
        )
        assert_same(reference, fused)


@pytest.mark.parametrize("combine", ["weighted_loss", "sum", "mixture", "confidence"])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
def test_fused_equals_full_logits_for_two_teachers(batch, teachers, combine, kd_ratio):
    """Padded teacher vocabularies, per-teacher temperatures, weights, the CE/KD mix, a student temperature."""
    student = causal_lm(V, 32, 0, tie_word_embeddings=True)  # full fine-tuning through a tied head
    opts = options(kind="forward_kld", combine=combine, kd_ratio=kd_ratio, temperature=1.5)
    reference = value_and_grads(student, lambda: reference_objective(student, batch, teachers, opts))
    assert "model.embed_tokens.weight" in reference[1]
    for chunk_size in (0, 5, 1000):
        fused = value_and_grads(
            student,
            lambda c=chunk_size: step(student, batch, teachers, opts, c).objective,
        )
        assert_same(reference, fused)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_lora_student_with_self_and_online_teachers(batch, teachers, modules_to_save):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    student = get_peft_model(causal_lm(V, 32, 0), lora)
    with torch.no_grad():  # move the adapters off their zero start so that teacher != student
        for name, p in student.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    pair = [SelfTeacher(spec("self", weight=0.5), student), teachers[0]]
    opts = options(kind="jsd")
    reference = value_and_grads(student, lambda: reference_objective(student, batch, pair, opts))
    assert any("lora_B" in n for n in reference[1])
    assert (modules_to_save is not None) == any("modules_to_save" in n for n in reference[1])
    fused = value_and_grads(student, lambda: step(student, batch, pair, opts, 3).objective)
    assert_same(reference, fused)
    assert all(m.training for m in student.modules()) or not student.training


class StoredTeacher:
    """A stored teacher holding every id of the student's width: its SparseRows equal the dense rows exactly, and
    every combine takes the rows route that stores take."""

    def __init__(self, teacher):
        self.spec, self.teacher, self.projects = spec("stored", weight=0.4), teacher, False

    def rows(self, batch, mask):
        log_p = torch.log_softmax(self.teacher.rows(batch, mask).logits[:, :V].double(), -1)
        return SparseRows(
            torch.arange(V).expand(len(log_p), V), log_p.float(), torch.full((len(log_p),), -torch.inf), V
        )


@pytest.mark.parametrize("combine", ["weighted_loss", "mixture", "confidence"])
def test_stored_rows_are_sliced_with_the_student_chunks(batch, teachers, combine):
    student = causal_lm(V, 32, 0)
    mixed = [StoredTeacher(teachers[0]), teachers[1]]
    opts = options(kind="forward_kld", combine=combine)
    reference = value_and_grads(student, lambda: reference_objective(student, batch, mixed, opts))
    fused = value_and_grads(student, lambda: step(student, batch, mixed, opts, 4).objective)
    assert_same(reference, fused)


# ---------------------------------------------------------------- what the fused path must never do


class RecordLogitShapes(torch.overrides.TorchFunctionMode):
    """Every tensor a torch function returns whose last dim is a vocabulary width, weights (and views of them)
    aside: (phase, rows before that dim)."""

    def __init__(self, widths, *models):
        super().__init__()
        self.widths, self.phase, self.seen = set(widths), "forward", []
        self.weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] in self.widths:
                if t.untyped_storage().data_ptr() in self.weights:
                    continue
                self.seen.append((self.phase, t.numel() // t.shape[-1]))
        return out


def test_no_full_logits_and_no_recompute_in_backward(batch, teachers):
    student = causal_lm(V, 32, 0)
    n = int(label_positions(batch["labels"])[0].sum())
    models = [student] + [t.model for t in teachers]
    record = RecordLogitShapes([V] + [t.model.config.vocab_size for t in teachers], *models)
    with record:
        sums = step(student, batch, teachers, options(), 4)
        record.phase = "backward"
        sums.objective.backward()
    rows = [r for phase, r in record.seen if phase == "forward"]
    assert n > 8 and max(rows) == 4, "logits exist for at most one chunk of positions at a time"
    assert not [r for phase, r in record.seen if phase == "backward" and r > 0], "backward recomputed logits"
    assert (
        student.lm_head.weight.grad is not None
        and student.model.layers[0].mlp.up_proj.weight.grad is not None
    )
    # the plain path does hold every label row at once: the recorder can tell the two apart
    plain = RecordLogitShapes(record.widths, *models)
    with plain:
        step(student, batch, teachers, options(), 0)
    assert max(r for _, r in plain.seen) >= n


def test_all_masked_batch_gives_zero_loss_and_zero_gradients(batch, teachers):
    student = causal_lm(V, 32, 0)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    sums = step(student, empty, teachers, options(), 4)
    sums.objective.backward()
    assert sums.n_tokens == 0 and float(sums.objective.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.parameters() if p.grad is not None)


def test_evaluation_under_no_grad_gives_the_same_sums(batch, teachers):
    student = causal_lm(V, 32, 0)
    with torch.no_grad():
        plain = step(student, batch, teachers, options(), 0)
        fused = step(student, batch, teachers, options(), 4)
    assert not fused.objective.requires_grad
    for a, b in [
        (plain.ce_sum, fused.ce_sum),
        (plain.kd_sum, fused.kd_sum),
        *zip(plain.own_sums, fused.own_sums),
    ]:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)


def test_head_with_logit_postprocessing_falls_back_to_the_plain_path(batch, teachers):
    student = causal_lm(V, 32, 0)
    student.config.final_logit_softcapping = 30.0  # as Gemma 2 declares it
    reference = value_and_grads(student, lambda: step(student, batch, teachers, options(), 0).objective)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = value_and_grads(student, lambda: step(student, batch, teachers, options(), 4).objective)
    assert any("final_logit_softcapping" in str(w.message) for w in caught)
    assert_same(reference, fused, rtol=0)


def test_bf16_model_under_mixed_precision_output_conversion(batch, teachers):
    """accelerate's mixed precision returns fp32 outputs (hidden states too) from a bf16 model."""
    from accelerate.utils import convert_outputs_to_fp32
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    student = get_peft_model(causal_lm(V, 32, 0).to(torch.bfloat16), lora)
    student.forward = convert_outputs_to_fp32(student.forward)
    pair = [SelfTeacher(spec("self", weight=0.5), student), teachers[0]]
    results = [
        value_and_grads(student, lambda c=c: step(student, batch, pair, options(), c).objective)
        for c in (0, 4)
    ]
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)
    assert plain_grads.keys() == fused_grads.keys()
    for name, g in plain_grads.items():
        assert torch.isfinite(fused_grads[name]).all()
        assert float((fused_grads[name] - g).abs().max()) <= 0.05 * float(g.abs().max()) + 1e-6, name


# ---------------------------------------------------------------- logits and hidden states at label positions


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_label_rows_equal_the_full_forward(batch, arch):
    model = causal_lm(V, 32, 3, arch=arch).eval()
    mask, _ = label_positions(batch["labels"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
            mask
        ]
        rows = logits_at_labels(model, batch, mask)
        hidden = hidden_at_labels(model, batch, mask)
    assert rows.shape == (int(mask.sum()), V)
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lm_head(hidden), full, rtol=0, atol=1e-6)


def test_fused_head_loss_alone_matches_cross_entropy():
    """No teacher: chunked CE through a biased linear head, gradients for hidden, weight and bias."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=g)
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    wrt = [hidden, head.weight, head.bias]
    grads = torch.autograd.grad(expected, wrt)
    sums = fused_head_loss(hidden, head, targets, [], [], [], loss_spec(kd_ratio=0.0, chunk_size=5))
    torch.testing.assert_close(sums.objective, expected)
    for a, b in zip(torch.autograd.grad(sums.objective * 1.0, wrt), grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_head_loss(hidden, head, targets, [], [], [], loss_spec(kd_ratio=0.0, chunk_size=0))


# ---------------------------------------------------------------- through the trainer and the config


def test_chunk_size_is_a_checked_config_key(tmp_path):
    from easydistill.config import load_config
    from easydistill.errors import ConfigError

    raw = {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": str(tmp_path / "x.jsonl")},
        "models": {"teacher": "t", "student": "s"},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    assert load_config(raw).distillation.chunk_size == "auto"
    assert load_config({**raw, "distillation": {"chunk_size": 0}}).distillation.chunk_size == 0
    assert load_config({**raw, "distillation": {"chunk_size": 64}}).distillation.chunk_size == 64
    with pytest.raises(ConfigError, match=r"\$\.distillation\.chunk_size"):
        load_config({**raw, "distillation": {"chunk_size": -1}})
    with pytest.raises(
        ConfigError, match=r"\$\.distillation\.chunk_size: 'fast' is not \"auto\" or an integer"
    ):
        load_config({**raw, "distillation": {"chunk_size": "fast"}})


def test_training_with_chunks_equals_training_without(tiny_pair, tmp_path):
    """Two SGD steps with a self-teacher and an online teacher: the same updates, chunked or not."""
    from kd_helpers import kd_config, load_adapter_weights, max_abs_diff, train, write_records

    data = write_records(tmp_path / "train.jsonl", n=8)
    updates = []
    for chunk_size in (0, 5):
        out = tmp_path / f"chunk{chunk_size}"
        raw = kd_config(
            tiny_pair,
            data,
            out,
            models={"teacher": ["self", str(tiny_pair[0])]},
            distillation={"chunk_size": chunk_size, "distillation_type": "jsd"},
            training={
                "optim": "sgd",
                "learning_rate": 1.0,
                "max_grad_norm": 0.0,
                "lr_scheduler_type": "constant",
            },
        )
        train(raw)
        updates.append(load_adapter_weights(out))
    assert max(float(v.abs().max()) for k, v in updates[0].items() if "lora_B" in k) > 1e-3
    assert max_abs_diff(*updates) < 1e-5
