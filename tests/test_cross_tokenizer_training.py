"""Cross-tokenizer teachers in runs: validation, the same-tokenizer invariant, training with one or several
teachers, the fused path and on-policy batches."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, prepare, train, write_records

from easydistill import cli, validate
from easydistill.data import KDCollator
from easydistill.train.step import kd_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("xtok-data") / "add.jsonl", "add", n=16)


@pytest.fixture(scope="module")
def sp_teacher(tmp_path_factory):
    """A Llama teacher whose tokenizer is sentencepiece-style BPE with another chat template (as a Qwen2 folder,
    transformers would rebuild its tokenizer as Qwen2's byte-level one)."""
    from examples import synthetic
    from examples.tiny_models import TEACHER, build_model
    from examples.tiny_tokenizers import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(synthetic.corpus(), 400)
    folder = tmp_path_factory.mktemp("sp-teacher") / "model"
    return build_model(folder, arch="llama", tokenizer=tokenizer, seed=3, **TEACHER)


def run_validate(raw, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as info:
        cli.run(validate.main, ["--config", str(path)])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_validate_reports_the_pair_or_refuses_it(tiny_pair, sp_teacher, data, tmp_path, capsys):
    raw = kd_config(tiny_pair, data, tmp_path / "out", models={"teacher": str(sp_teacher)})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    command = [sys.executable, "-X", "importtime", "-m", "easydistill.validate", "--config", str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "$.models.teacher: cross-tokenizer distillation" in proc.stdout
    assert "vocabulary overlap" in proc.stdout and "response characters in aligned tokens" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "easydistill.data.cross_pair" in imported
    assert sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")) == []
    refused = copy.deepcopy(raw)
    refused["distillation"]["cross_tokenizer_min_overlap"] = 0.99
    code, _, err = run_validate(refused, tmp_path, capsys)
    assert code == 2 and "of the student's vocabulary matches a teacher entry" in err and "0.99" in err
    refused["distillation"]["cross_tokenizer"] = "off"
    code, _, err = run_validate(refused, tmp_path, capsys)
    assert code == 2 and 'cross_tokenizer is "off"' in err


def first_batch(run, n=4):
    dataset = run.trainer.train_dataset
    return KDCollator(run.tokenizer.pad_token_id)([dataset[i] for i in range(n)])


@pytest.mark.parametrize("chunk_size", [0, 8])
@pytest.mark.parametrize("kind", ["forward_kld", "jsd"])
def test_same_tokenizer_through_the_cross_path_gives_the_ordinary_loss(
    tiny_pair, data, tmp_path, chunk_size, kind
):
    """The invariant that proves the alignment: one tokenizer on both sides, every position aligned one to one,
    the map the identity and k = the vocabulary, so the projected rows are the teacher's own distribution."""
    distillation = {"chunk_size": chunk_size, "distillation_type": kind, "temperature": 2.0}
    sums = {}
    for mode in ("off", "on"):
        d = {**distillation, "cross_tokenizer": mode, "cross_tokenizer_top_k": 4096}
        run = prepare(kd_config(tiny_pair, data, tmp_path / mode, distillation=d))
        if mode == "on":
            assert run.trainer.teachers[0].spec.kind == "cross_tokenizer"
        batch = first_batch(run)
        model = run.trainer.model
        result = kd_step(run.trainer.model, batch, run.trainer.teachers, run.cfg.loss)
        result.objective.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sums[mode] = (result.kd_sum, result.ce_sum, grads)
        if mode == "on":
            counts = run.trainer.teachers[0].take_counts()
            assert (
                counts["aligned_positions"]
                == counts["label_positions"]
                == int((batch["labels"][:, 1:] != -100).sum())
            )
            assert counts["mapped_mass"] == pytest.approx(counts["aligned_positions"], rel=1e-5)
    assert float(sums["off"][0]) > 0
    torch.testing.assert_close(sums["on"][0], sums["off"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sums["on"][1], sums["off"][1])
    for name, grad in sums["off"][2].items():
        torch.testing.assert_close(sums["on"][2][name], grad, rtol=1e-3, atol=1e-6)


def test_cross_tokenizer_teacher_trains_and_logs_its_counts(tiny_pair, sp_teacher, data, tmp_path):
    raw = kd_config(
        tiny_pair, data, tmp_path / "out", models={"teacher": str(sp_teacher)}, training={"max_steps": 2}
    )
    metrics = train(raw)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "kd_loss" in h]
    assert logged and all(h["kd_loss"] > 0 for h in logged)
    name = "model"
    assert all(
        0.5 < h[f"aligned_share/{name}"] <= 1.0 and 0.9 < h[f"mapped_mass/{name}"] <= 1.0 for h in logged
    )
    assert metrics["train_loss"] == metrics["train_loss"]  # finite


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_teachers_with_and_without_the_students_tokenizer_together(
    tiny_pair, sp_teacher, data, tmp_path, chunk_size
):
    teacher, _ = tiny_pair
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        models={"teacher": [str(teacher), str(sp_teacher)]},
        distillation={"chunk_size": chunk_size, "combine": "weighted_loss"},
    )
    run = prepare(raw)
    kinds = [t.spec.kind for t in run.trainer.teachers]
    assert kinds == ["online", "cross_tokenizer"]
    batch = first_batch(run)
    result = kd_step(run.trainer.model, batch, run.trainer.teachers, run.cfg.loss)
    own = [float(o) for o in result.own_sums]
    assert all(o > 0 for o in own)
    assert float(result.kd_sum) == pytest.approx(sum(w * o for w, o in zip([0.5, 0.5], own)), rel=1e-5)


def test_on_policy_samples_reach_the_cross_tokenizer_teacher(tiny_pair, sp_teacher, data, tmp_path):
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        models={"teacher": str(sp_teacher)},
        distillation={"lmbda": 1.0, "max_new_tokens": 6},
        training={"max_steps": 1},
    )
    train(raw)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "kd_loss" in h]
    assert logged[0]["on_policy_fraction"] == 1.0 and logged[0]["aligned_positions/model"] > 0


def test_store_holds_rows_already_on_the_students_vocabulary(tiny_pair, sp_teacher, data, tmp_path):
    """kd.infer for a teacher with another tokenizer stores its projected rows with the map's hash; training from
    the store reads the same rows the online teacher gives, and a store made through another map is refused."""
    from easydistill.config import load_config
    from easydistill.errors import UserError
    from easydistill.store.precompute import prepare_teacher_outputs
    from easydistill.teachers.cached import CachedTeacher

    store = tmp_path / "logits"
    blocks = dict(
        models={"teacher": str(sp_teacher)},
        distillation={"cross_tokenizer_top_k": 32},
        inference={"top_logits_num": 32, "batch_size": 3},
    )
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        job_type="kd_white_box",
        dataset={"logits_path": str(store)},
        **blocks,
    )
    prepare_teacher_outputs(load_config(raw), log=lambda *a: None)
    index = json.loads((store / "index.json").read_text())
    online = prepare(kd_config(tiny_pair, data, tmp_path / "online", **blocks))
    teacher = online.trainer.teachers[0]
    assert index["vocab_map"] == teacher.map_hash and index["vocab_width"] == teacher.width
    cfg = load_config(raw)
    cached = CachedTeacher.open(cfg.teachers[0], cfg)
    batch = first_batch(online)
    mask = batch["labels"][:, 1:] != -100
    stored, live = cached.rows(batch, mask), teacher.rows(batch, mask)
    assert torch.equal(stored.ids, live.ids)
    torch.testing.assert_close(stored.log_probs, live.log_probs, atol=2e-3, rtol=1e-3)  # fp16 on disk
    index["vocab_map"] = "0" * 16
    (store / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="went through vocabulary map"):
        CachedTeacher.open(cfg.teachers[0], cfg)


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """examples.cross_tokenizer_demo --fast: a teacher of another tokenizer trained, KD and CE-only students,
    held-out figures on the teacher's projected distribution."""
    import math

    from examples import cross_tokenizer_demo

    monkeypatch.setenv("EASYDISTILL_CACHE", str(tmp_path / "cache"))
    assert cross_tokenizer_demo.main(["--fast", "--workdir", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert "cross-tokenizer distillation" in report["preflight"][0]
    assert 0.9 <= report["alignment"]["aligned_share"] <= 1.0 and report["alignment"]["mapped_mass"] > 0.9
    rows = report["rows"]
    assert all(math.isfinite(r[k]) for r in rows.values() for k in ("ce", "kl", "top1_agreement"))
    assert rows["student_kd"]["kl"] < rows["student_before"]["kl"]  # three KD steps move towards the teacher


def test_seq_kd_with_a_cross_tokenizer_teacher_is_refused(tiny_pair, sp_teacher, data, tmp_path, capsys):
    raw = kd_config(
        tiny_pair, data, tmp_path / "out", models={"teacher": str(sp_teacher)}, distillation={"seq_kd": True}
    )
    code, _, err = run_validate(raw, tmp_path, capsys)
    assert code == 2 and "seq_kd" in err and "another tokenizer" in err
