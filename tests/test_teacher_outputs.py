"""What the teacher computes before training: EasyDistill v1 logits imports (aligned to the label positions)
and teacher-written answers that black- and white-box runs then train on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from kd_helpers import kd_config, prepare, write_records

from easydistill.cli import run
from easydistill.config import load_config
from easydistill.data import load_records
from easydistill.model_files import embedding_rows
from examples.synthetic import make_records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl", n=10)


def _exit_code(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def write_v1_logits(tiny_pair, data: Path, path: Path, *, late: bool = False, k: int = 4) -> Path:
    """A v1 file as EasyDistill v1's vLLM step wrote it: per record (file order), per response token, the
    teacher's top-k probabilities plus the sampled (here: label) token. `late` shifts every row one position
    later, the misalignment v1's trainer applied."""
    from transformers import AutoModelForCausalLM

    raw = kd_config(tiny_pair, data, path.parent / "unused", dataset={"eval_ratio": 0.3})
    run_ = prepare(raw)
    examples = {ex.sample_id: ex for ex in run_.train_examples + run_.eval_examples}
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    width = embedding_rows(str(tiny_pair[1]))
    lines = []
    for record in load_records(data):
        ex = examples[record["id"]]
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            probs = teacher(input_ids=ids).logits[0, :-1, :width].softmax(-1)  # (T-1, W)
        positions = [t for t in range(len(ex.input_ids) - 1) if ex.labels[t + 1] != -100]
        rows = []
        for t in positions[1:] + positions[-1:] if late else positions:
            top = probs[t].topk(k).indices.tolist()
            keep = dict.fromkeys([*top, ex.input_ids[t + 1]])
            rows.append({str(i): float(probs[t, i]) for i in keep})
        lines.append(json.dumps(rows))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_v1_logits_import_aligned_to_label_positions_and_train(tiny_pair, data, tmp_path):
    v1_file = write_v1_logits(tiny_pair, data, tmp_path / "logits.json")
    raw = kd_config(
        tiny_pair, data, tmp_path / "out", dataset={"logits_path": str(v1_file), "eval_ratio": 0.3}
    )
    from easydistill.kd.train import main

    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--config", str(tmp_path / "config.json")])
    assert exit_info.value.code == 0
    assert (tmp_path / "logits.json.store" / "index.json").is_file(), (
        "converted on first use, beside the file"
    )
    assert json.loads((tmp_path / "out/metrics.json").read_text())["train_loss"] > 0

    # Row j of a record must be the distribution that predicts response token j, as the teacher computes it.
    from transformers import AutoModelForCausalLM

    cached = prepare({**raw, "training": {**raw["training"], "output_dir": str(tmp_path / "again")}})
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    for loader in (cached.trainer.get_train_dataloader(), cached.trainer.get_eval_dataloader()):
        batch = next(iter(loader))
        mask = batch["labels"][:, 1:] != -100
        rows = cached.trainer.teachers[0].rows(batch, mask)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = logits[:, :-1][mask][:, : rows.vocab_width].log_softmax(-1)  # (N, W)
        stored = rows.ids >= 0
        assert stored[:, :4].all()
        got = rows.log_probs[stored]
        torch.testing.assert_close(got, want.gather(-1, rows.ids.clamp(min=0))[stored], rtol=0, atol=2e-2)
        targets = batch["labels"][:, 1:][mask]
        assert (rows.ids == targets[:, None]).any(-1).all(), "each row holds its label token"
        tail = 1 - want.gather(-1, rows.ids.clamp(min=0)).exp().masked_fill(~stored, 0).sum(-1)
        torch.testing.assert_close(rows.tail.exp(), tail, rtol=0, atol=2e-3)


def test_v1_rows_one_position_late_are_refused(tiny_pair, data, tmp_path, capsys):
    from easydistill.kd.infer import main

    late = write_v1_logits(tiny_pair, data, tmp_path / "late.jsonl", late=True)
    raw = kd_config(tiny_pair, data, tmp_path / "out", dataset={"logits_path": str(tmp_path / "store")})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    code, err = _exit_code(
        main, ["--config", str(tmp_path / "config.json"), "--import-v1", str(late)], capsys
    )
    assert code == 2 and "label tokens are among the ids" in err and "late.jsonl" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


def _prompts(path: Path, n: int = 6) -> Path:
    path.write_text(json.dumps([r["instruction"] for r in make_records("reverse", n, seed=5)]))
    return path


def test_black_box_trains_on_teacher_answers(tiny_pair, tmp_path):
    from easydistill.kd.train import main

    prompts = _prompts(tmp_path / "prompts.json")
    raw = kd_config(tiny_pair, prompts, tmp_path / "out", job_type="kd_black_box_local")
    raw["dataset"] = {"instruction_path": str(prompts)}
    raw["inference"] = {"max_new_tokens": 5, "batch_size": 4}
    raw["training"]["max_steps"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--config", str(tmp_path / "config.json")])
    assert exit_info.value.code == 0
    answers = json.loads((tmp_path / "out/teacher_answers.json").read_text())
    assert [sorted(r) for r in answers] == [["id", "instruction", "output"]] * 6
    assert [r["instruction"] for r in answers] == json.loads(prompts.read_text())
    history = json.loads((tmp_path / "out/trainer_state.json").read_text())["log_history"]
    assert history[0]["ce_loss"] > 0 and "kd_loss" not in history[0]


def test_white_box_writes_answers_scores_them_then_trains(tiny_pair, tmp_path):
    from easydistill.kd.train import main

    prompts = _prompts(tmp_path / "prompts.json")
    labeled, store = tmp_path / "answers.jsonl", tmp_path / "logits"
    raw = kd_config(tiny_pair, prompts, tmp_path / "out", job_type="kd_white_box")
    raw["dataset"] = {
        "instruction_path": str(prompts),
        "labeled_path": str(labeled),
        "logits_path": str(store),
    }
    raw["inference"] = {"max_new_tokens": 5, "top_logits_num": 7}
    raw["training"]["max_steps"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--config", str(tmp_path / "config.json")])
    assert exit_info.value.code == 0
    assert len(labeled.read_text().splitlines()) == 6
    index = json.loads((store / "index.json").read_text())
    assert index["top_k"] == 7 and len(index["splits"]["train"]["ids"]) == 6
    history = json.loads((tmp_path / "out/trainer_state.json").read_text())["log_history"]
    assert math.isfinite(history[0]["kd_loss"]) and history[0]["kd_loss"] > 0
    assert load_config(raw).teachers[0].kind == "cached"


def test_v1_multi_teacher_shape_runs(tiny_pair, data, tmp_path, capsys):
    """EasyDistill v1's kd_white_box_train_only_multi: a list of teacher folders paired by position with a
    list of v1 logits files, run by kd.multi_train."""
    from easydistill.kd.multi_train import main

    first = write_v1_logits(tiny_pair, data, tmp_path / "teacher0.json")
    second = write_v1_logits(tiny_pair, data, tmp_path / "teacher1.json", k=2)
    raw = kd_config(tiny_pair, data, tmp_path / "out", training={"max_steps": 2})
    raw["job_type"] = "kd_white_box_train_only_multi"
    raw["models"]["teacher"] = [str(tiny_pair[0]), str(tiny_pair[0])]
    raw["dataset"]["logits_path"] = [str(first), str(second)]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    code, err = _exit_code(main, ["--config", str(tmp_path / "config.json")], capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "out/trainer_state.json").read_text())["log_history"]
    names = [k for k in log[0] if k.startswith("kd_loss/")]
    assert len(names) == 2 and all(log[0][k] > 0 for k in names)
    # v1 summed its teachers' KD losses, and a v1 list keeps that meaning (each would weigh 1/2 otherwise).
    assert log[0]["kd_loss"] == pytest.approx(sum(log[0][k] for k in names), abs=3e-6)
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
