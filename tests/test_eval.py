"""easydistill.evaluation.metrics.heldout_metrics on constructed inputs with known answers, and the eval command."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from kd_helpers import write_records

from easydistill.cli import run
from easydistill.data import IGNORE_INDEX
from easydistill.evaluation.metrics import ModelRows, heldout_metrics
from easydistill.loss.rows import SparseRows
from examples import synthetic


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: (B, T) inputs -> the stored (B, T, V) logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("stored", logits)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.stored.clone())


class FixedRows:
    """A stored teacher: hands over the same SparseRows for the one batch."""

    def __init__(self, rows: SparseRows):
        self.rows_ = rows

    def rows(self, batch, mask):
        assert int(mask.sum()) == len(self.rows_)
        return self.rows_


def one_batch(labels: list[list[int]]) -> dict:
    labels = torch.tensor(labels)
    return {
        "input_ids": torch.zeros_like(labels),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
    }


def log(x) -> torch.Tensor:
    return torch.log(torch.tensor(x, dtype=torch.float64))


def test_identical_models_kl_and_jsd_zero_agreement_one():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1)) * 3
    batch = one_batch([[IGNORE_INDEX, 1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    model = FixedLogits(logits)
    got = heldout_metrics(model, {"twin": ModelRows(FixedLogits(logits.clone()))}, [batch])
    versus = got["versus"]["twin"]
    assert got["n_tokens"] == 6
    assert versus["kl"] == pytest.approx(0.0, abs=1e-6)
    assert versus["jsd"] == pytest.approx(0.0, abs=1e-6)
    assert versus["top1_agreement"] == 1.0
    # the teacher's own figures are the model's own
    assert got["teachers"]["twin"]["ce"] == pytest.approx(got["model"]["ce"], rel=1e-6)


def test_known_pair_kl_jsd_ce_perplexity_by_hand():
    # Teacher (1/2, 1/4, 1/4), student (1/4, 1/4, 1/2) at the single counted position; label = token 0.
    p, q = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    teacher = log(p).float().expand(1, 2, 3).contiguous()
    student = log(q).float().expand(1, 2, 3).contiguous()
    batch = one_batch([[IGNORE_INDEX, 0]])
    got = heldout_metrics(FixedLogits(student), {"t": ModelRows(FixedLogits(teacher))}, [batch])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)  # = 0.25 log 2
    m = [(a + b) / 2 for a, b in zip(p, q)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m)
    )
    versus = got["versus"]["t"]
    assert versus["kl"] == pytest.approx(kl, abs=1e-6) and kl == pytest.approx(0.25 * math.log(2))
    assert versus["jsd"] == pytest.approx(jsd, abs=1e-6)
    assert versus["top1_agreement"] == 0.0  # teacher's argmax is 0, the student's is 2
    assert got["model"]["ce"] == pytest.approx(math.log(4), abs=1e-6)  # -log q(0)
    assert got["model"]["perplexity"] == pytest.approx(4.0, rel=1e-5)
    assert got["model"]["accuracy"] == 0.0
    assert got["teachers"]["t"]["ce"] == pytest.approx(math.log(2), abs=1e-6)
    assert got["teachers"]["t"]["accuracy"] == 1.0


def test_stored_top_k_teacher_coverage_kl_and_ce_by_hand():
    # Vocabulary of 4; the teacher stored 2 ids: token 1 with 0.6, token 3 with 0.3; tail 0.1 (tokens 0, 2).
    ids = torch.tensor([[1, 3], [1, 3]])
    rows = SparseRows(ids, log([[0.6, 0.3]] * 2).float(), log([0.1, 0.1]).float(), vocab_width=4)
    q = [0.1, 0.5, 0.2, 0.2]  # the student at both positions
    student = log(q).float().expand(1, 3, 4).contiguous()
    batch = one_batch([[IGNORE_INDEX, 1, 2]])  # labels: token 1 (stored), token 2 (in the tail)
    got = heldout_metrics(FixedLogits(student), {"store": FixedRows(rows)}, [batch])
    versus = got["versus"]["store"]
    assert versus["topk_mass"] == pytest.approx(0.9, abs=1e-6)
    assert versus["student_topk_mass"] == pytest.approx(0.7, abs=1e-6)  # q(1) + q(3)
    # KL over the 2 stored ids + the tail bucket: teacher (0.6, 0.3, 0.1), student (0.5, 0.2, 0.3)
    kl = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.3)
    assert versus["kl"] == pytest.approx(kl, abs=1e-5)
    assert versus["top1_agreement"] == 1.0  # both pick token 1
    # teacher CE: -log 0.6 for the stored label, -log(0.1 / 2) for the label in the two-token tail
    teacher = got["teachers"]["store"]
    assert teacher["ce"] == pytest.approx((-math.log(0.6) - math.log(0.05)) / 2, abs=1e-5)
    assert teacher["accuracy"] == 0.5


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli")
    train = write_records(root / "train.jsonl", "sort", n=16, seed=1)
    held = root / "held.jsonl"
    held.write_text(
        "".join(json.dumps(r) + "\n" for r in synthetic.make_records("sort", 6, seed=2, exclude=[]))
    )
    return root, train, held


def eval_config(tiny_pair, eval_files, **dataset) -> dict:
    root, train, held = eval_files
    teacher, student = tiny_pair
    return {
        "job_type": "kd_white_box_train_only",
        "dataset": {"labeled_path": str(train), "eval_path": str(held), **dataset},
        "distillation": {"max_seq_length": 64},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {"output_dir": str(root / "out"), "per_device_eval_batch_size": 4},
    }


def call(argv) -> int:
    with pytest.raises(SystemExit) as info:
        run(__import__("easydistill.eval", fromlist=["main"]).main, argv)
    return info.value.code


def test_eval_command_prints_the_table_and_writes_json(tiny_pair, eval_files, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(eval_config(tiny_pair, eval_files)))
    out = tmp_path / "eval.json"
    assert call(["--config", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "KL(T||S)" in printed and "teacher teacher [online]" in printed
    result = json.loads(out.read_text())
    assert result["model"] == str(tiny_pair[1])  # no run in output_dir yet: the student before training
    assert result["n_examples"] == 6 and result["n_tokens"] > 0
    student, teacher = result["student"], result["teachers"]["teacher"]
    assert student["exact_match"] == 0.0 and teacher["exact_match"] == 0.0  # random models
    assert student["perplexity"] == pytest.approx(math.exp(student["ce"]))
    versus = student["vs"]["teacher"]
    assert versus["kl"] > 0 and 0 < versus["jsd"] <= math.log(2) and 0 <= versus["top1_agreement"] <= 1

    # the teacher evaluated as the model: its KL to itself is 0. The existing --out is replaced only when asked.
    again = ["--config", str(path), "--out", str(out), "--model", str(tiny_pair[0]), "--no-generate"]
    before = out.read_bytes()
    assert call(again) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert call([*again, "--overwrite"]) == 0
    itself = json.loads(out.read_text())["student"]
    assert itself["vs"]["teacher"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert itself["vs"]["teacher"]["top1_agreement"] == 1.0 and itself["exact_match"] is None


def test_eval_command_user_errors_exit_2(tiny_pair, eval_files, tmp_path, capsys):
    raw = eval_config(tiny_pair, eval_files)
    del raw["dataset"]["eval_path"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    assert call(["--config", str(path)]) == 2
    assert "eval_path" in capsys.readouterr().err
    path.write_text(json.dumps(eval_config(tiny_pair, eval_files)))
    assert call(["--config", str(path), "--model", str(tmp_path / "nowhere")]) == 2
    assert "--model" in capsys.readouterr().err
    bad = eval_config(tiny_pair, eval_files)
    bad["evaluation"] = {"exact_match": "sometimes"}
    path.write_text(json.dumps(bad))
    assert call(["--config", str(path)]) == 2
    assert "$.evaluation.exact_match" in capsys.readouterr().err


def test_eval_of_a_trained_adapter_against_its_self_teacher(tiny_pair, eval_files, tmp_path, capsys):
    from kd_helpers import kd_config, train

    root, train_path, held = eval_files
    raw = kd_config(
        tiny_pair,
        train_path,
        tmp_path / "run",
        dataset={"eval_path": str(held)},
        models={"teacher": "self"},
        training={"learning_rate": 1e-2},
        evaluation={"report": False},
    )
    train(raw)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    assert call(["--config", str(path), "--no-generate"]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["model"] == str(tmp_path / "run")  # the adapter in output_dir, applied to models.student
    versus = result["student"]["vs"]["self"]
    assert 0.0 < versus["kl"] < 1.0  # two steps of LoRA moved the student away from its base, a little
    assert result["teachers"]["self"]["kind"] == "self"


def test_a_full_store_evaluates_like_the_online_teacher(tiny_pair, eval_files, tmp_path, capsys):
    """k = the vocabulary width: the stored teacher holds every probability, so its figures are the online one's."""
    from easydistill.config import load_config
    from easydistill.store.precompute import prepare_teacher_outputs

    root, train_path, _ = eval_files
    teacher, student = tiny_pair
    raw = {
        "job_type": "kd_white_box",
        "dataset": {
            "labeled_path": str(train_path),
            "eval_ratio": 0.25,
            "logits_path": str(tmp_path / "logits"),
        },
        "inference": {"top_logits_num": 100_000, "batch_size": 8},
        "distillation": {"max_seq_length": 64},
        "models": {"teacher": str(teacher), "student": str(student)},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    prepare_teacher_outputs(load_config(raw), log=lambda *a: None)
    figures = {}
    for name, variant in (
        ("stored", raw),
        ("online", {**raw, "dataset": {**raw["dataset"], "logits_path": None}}),
    ):
        variant = json.loads(json.dumps(variant))
        if variant["dataset"]["logits_path"] is None:
            del variant["dataset"]["logits_path"]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(variant))
        out = tmp_path / f"{name}-eval.json"
        assert call(["--config", str(path), "--out", str(out), "--no-generate"]) == 0, capsys.readouterr().err
        figures[name] = json.loads(out.read_text())
    stored, online = (figures[k]["student"]["vs"]["teacher"] for k in ("stored", "online"))
    assert stored["topk_mass"] == pytest.approx(1.0, abs=1e-3)
    assert stored["student_topk_mass"] == pytest.approx(1.0, abs=1e-5)  # every id is stored
    assert stored["kl"] == pytest.approx(online["kl"], rel=2e-2)  # fp16 on disk
    assert stored["top1_agreement"] == pytest.approx(online["top1_agreement"], abs=0.05)
    # The stored teacher's own CE covers the stored width only (its padded embedding rows are not stored)
    own = figures["stored"]["teachers"]["teacher"]
    assert own["kind"] == "cached" and own["approximate_ce"] and math.isfinite(own["ce"])
    assert "topk_mass" not in online
