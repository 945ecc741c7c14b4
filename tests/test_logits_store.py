"""The top-k logits store: exact against the online teacher at k = V, rows by sample under shuffling, loud
failures on truncated, corrupted or foreign stores, and resume of an interrupted kd.infer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kd_helpers import kd_config, prepare, write_records

from easydistill.cli import run
from easydistill.config import load_config
from easydistill.loss import divergence as losses
from easydistill.model_files import embedding_rows
from easydistill.store.precompute import prepare_teacher_outputs, score_into_store, training_examples
from easydistill.store.topk import TopKLogitsStore, pack_ids, partial_path, unpack_ids


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=12)


@pytest.fixture(scope="module")
def full_store(tiny_pair, data, tmp_path_factory) -> Path:
    """k = vocabulary width: the store holds every probability, so sparse KD must equal dense KD."""
    root = tmp_path_factory.mktemp("store")
    raw = kd_config(
        tiny_pair,
        data,
        root / "out",
        job_type="kd_white_box",
        dataset={"logits_path": str(root / "logits"), "eval_ratio": 0.25},
        inference={"top_logits_num": 100_000, "batch_size": 5},
    )
    prepare_teacher_outputs(load_config(raw), log=lambda *a: None)
    return root / "logits"


def cached_config(tiny_pair, data, out, store, **blocks) -> dict:
    blocks.setdefault("dataset", {})
    blocks["dataset"] = {"logits_path": str(store), "eval_ratio": 0.25, **blocks["dataset"]}
    return kd_config(tiny_pair, data, out, **blocks)


def test_ids_pack_into_2_3_or_4_bytes():
    ids = np.array([[0, 5, -1], [65_000, 1, 2]])
    for width, nbytes in ((285, 2), (151_936, 3), (20_000_000, 4)):
        from easydistill.store.topk import id_bytes_for

        assert id_bytes_for(width) == nbytes
        packed = pack_ids(ids, nbytes)
        assert packed.shape == (2, 3 * nbytes) and packed.dtype == np.uint8
        assert (unpack_ids(packed, nbytes) == ids).all()


def test_full_store_reproduces_the_online_teacher(tiny_pair, data, full_store, tmp_path):
    store = TopKLogitsStore(full_store)
    assert store.top_k == store.vocab_width == embedding_rows(str(tiny_pair[1]))  # the student's width
    assert store.count("train") == 9 and store.count("eval") == 3
    cached = prepare(cached_config(tiny_pair, data, tmp_path / "c", full_store))
    online = prepare(kd_config(tiny_pair, data, tmp_path / "o", dataset={"eval_ratio": 0.25}))
    for loader in ("get_train_dataloader", "get_eval_dataloader"):
        batch = next(iter(getattr(cached.trainer, loader)()))
        mask = batch["labels"][:, 1:] != -100
        student = torch.randn(int(mask.sum()), store.vocab_width)
        sparse = cached.trainer.teachers[0].rows(batch, mask)
        dense = online.trainer.teachers[0].rows(batch, mask)
        for kind in losses.KINDS:
            for temperature in (1.0, 2.0):
                want = losses.per_token_divergence(student, dense.logits, kind, temperature=temperature)
                got = sparse.per_token_divergence(student, kind, temperature=temperature)
                torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # fp16 log-probs on disk
        model = cached.trainer.model.eval()
        with torch.no_grad():
            losses_ = [r.trainer.compute_loss(model, batch) for r in (cached, online)]
        torch.testing.assert_close(losses_[0], losses_[1], rtol=1e-4, atol=1e-4)


def test_shuffled_accumulated_epochs_use_each_samples_rows(tiny_pair, data, full_store, tmp_path):
    """Rows follow the sample: the shuffled order differs from the store's, and over two epochs with
    accumulation every logged loss equals the online teacher's. Rows taken by step order would not."""
    training = {"max_steps": 5, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    cached = prepare(cached_config(tiny_pair, data, tmp_path / "c", full_store, training=training))
    order = [i for b in cached.trainer.get_train_dataloader() for i in b["sample_index"].tolist()]
    assert order != sorted(order), "the loader should shuffle"
    cached.trainer.train()
    online = prepare(
        kd_config(tiny_pair, data, tmp_path / "o", dataset={"eval_ratio": 0.25}, training=training)
    )
    online.trainer.train()
    logs = [[h for h in r.trainer.state.log_history if "kd_loss" in h] for r in (cached, online)]
    assert len(logs[0]) == 5 and cached.trainer.state.epoch > 1
    for a, b in zip(*logs):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=2e-3, abs=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4)


def _train_exit(raw: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    from easydistill.kd.train import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--config", str(config)])
    return exit_info.value.code, capsys.readouterr().err


def _copy_store(store: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, to))


def test_truncated_shard_stops_the_run(tiny_pair, data, full_store, tmp_path, capsys):
    store = _copy_store(full_store, tmp_path / "logits")
    shard = store / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    raw = cached_config(tiny_pair, data, tmp_path / "out", store)
    code, err = _train_exit(raw, tmp_path, capsys)
    assert code == 2 and "shard-00000.safetensors" in err and "truncated" in err
    assert "Traceback" not in err


def test_corrupted_shard_stops_the_run_naming_the_sample(tiny_pair, data, full_store, tmp_path, capsys):
    store = _copy_store(full_store, tmp_path / "logits")
    shard = store / "shard-00000.safetensors"
    raw_bytes = bytearray(shard.read_bytes())
    data_start = 8 + int.from_bytes(raw_bytes[:8], "little")  # safetensors: u64 header length, header, data
    raw_bytes[data_start:] = bytes(b ^ 0x5A for b in raw_bytes[data_start:])
    shard.write_bytes(bytes(raw_bytes))  # same size, valid header: only the checksums can tell
    code, err = _train_exit(cached_config(tiny_pair, data, tmp_path / "out", store), tmp_path, capsys)
    assert code == 2 and "checksum" in err and "sample '" in err and "shard-00000" in err


def test_store_for_other_data_stops_the_run(tiny_pair, data, full_store, tmp_path, capsys):
    other = write_records(tmp_path / "other.jsonl", task="add", n=12, seed=99)
    raw = cached_config(tiny_pair, other, tmp_path / "out", full_store)
    code, err = _train_exit(raw, tmp_path, capsys)
    assert code == 2 and "other token ids" in err and "sample '" in err


class _Counting(torch.nn.Module):
    """Wraps the teacher: counts forwards, and fails on the `fail_at`-th one (a crash mid-run)."""

    def __init__(self, model, fail_at=None):
        super().__init__()
        self.model, self.calls, self.fail_at = model, 0, fail_at

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.model(**kwargs)


def test_interrupted_infer_resumes_with_finished_shards(tiny_pair, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    cfg = load_config(kd_config(tiny_pair, data, tmp_path / "out"))
    train, evaluation, _ = training_examples(cfg, tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    width = embedding_rows(str(tiny_pair[1]))
    # 200-byte shards: a new shard every example or two, so a crash leaves several finished ones behind.
    opts = dict(top_k=8, width=width, batch_size=2, shard_bytes=200, progress=False)

    crashing = _Counting(teacher, fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        score_into_store(crashing, tokenizer, train, evaluation, tmp_path / "resumed", **opts)
    assert not (tmp_path / "resumed").exists(), "a crashed run must not leave a store that looks complete"
    sidecars = partial_path(tmp_path / "resumed").glob("shard-*.json")
    done = sum(len(json.loads(s.read_text())) for s in sidecars)
    assert 0 < done <= 6  # three batches of two ran; what reached a finished shard is kept

    counting = _Counting(teacher)
    score_into_store(counting, tokenizer, train, evaluation, tmp_path / "resumed", **opts)
    assert counting.calls == math.ceil((len(train) - done) / 2)  # finished examples were not scored again
    assert not partial_path(tmp_path / "resumed").exists()
    score_into_store(teacher, tokenizer, train, evaluation, tmp_path / "straight", **opts)

    resumed, straight = TopKLogitsStore(tmp_path / "resumed"), TopKLogitsStore(tmp_path / "straight")
    for i in range(resumed.count("train")):
        a, b = resumed.read(resumed.entry("train", i)), straight.read(straight.entry("train", i))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("combine", ["weighted_loss", "mixture", "confidence"])
def test_cached_teacher_in_a_teacher_list(tiny_pair, data, full_store, tmp_path, combine):
    """An online teacher and its own k = V store, weighted 0.7 / 0.3, give the single teacher's loss."""
    teacher = str(tiny_pair[0])
    pair = [
        {"path": teacher, "weight": 0.7},
        {"logits_path": str(full_store), "weight": 0.3, "name": "stored"},
    ]
    both = prepare(
        kd_config(
            tiny_pair,
            data,
            tmp_path / "b",
            models={"teacher": pair},
            dataset={"eval_ratio": 0.25},
            distillation={"combine": combine, "temperature": 2.0},
        )
    )
    assert [t.spec.kind for t in both.trainer.teachers] == ["online", "cached"]
    one = prepare(
        kd_config(
            tiny_pair, data, tmp_path / "o", dataset={"eval_ratio": 0.25}, distillation={"temperature": 2.0}
        )
    )
    batch = next(iter(both.trainer.get_train_dataloader()))
    model = both.trainer.model.eval()
    with torch.no_grad():
        got, want = (r.trainer.compute_loss(model, batch) for r in (both, one))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
