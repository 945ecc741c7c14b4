"""examples.quickstart --fast end to end: data, cached teacher, KD with the shipped config, the report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from examples import quickstart, synthetic
from examples.quickstart import CONFIG_PATH, FAST, REPO_ROOT
from examples.quickstart_teacher import TEACHER_MARKER, teacher_key

METRICS = {"ce", "kl", "top1_agreement", "exact_match", "accuracy", "n_tokens"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One --fast run into a fresh workdir and an empty cache, laid out like the repo (runs/quickstart)."""
    root = tmp_path_factory.mktemp("quickstart")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EASYDISTILL_CACHE", str(cache))
        # A folder left by a crashed build (no completion marker) must be replaced, never trusted.
        stale = cache / f"quickstart-teacher-{teacher_key(FAST)}"
        stale.mkdir(parents=True)
        (stale / "config.json").write_text("{}")
        workdir = root / "runs" / "quickstart"
        assert quickstart.main(["--fast", "--workdir", str(workdir)]) == 0
    return root, workdir, cache


def read_report(workdir: Path) -> dict:
    return json.loads((workdir / "report.json").read_text())


def test_report_has_the_table_before_and_after(first_run, capsys):
    _, workdir, cache = first_run
    report = read_report(workdir)
    assert report["task"] == FAST.task and report["n_heldout"] == FAST.n_heldout
    assert report["teacher_cached"] is False
    assert list(report["rows"]) == ["teacher", "student_before", "student_kd", "student_ce_only"]
    for row in report["rows"].values():
        assert set(row) == METRICS
        assert all(math.isfinite(row[k]) for k in METRICS)
        assert 0.0 <= row["top1_agreement"] <= 1.0 and 0.0 <= row["exact_match"] <= 1.0
    teacher, before, after = (report["rows"][k] for k in ("teacher", "student_before", "student_kd"))
    assert teacher["kl"] == pytest.approx(0.0, abs=1e-6) and teacher["top1_agreement"] == 1.0
    assert before["exact_match"] == 0.0
    assert after["kl"] < before["kl"]  # even three KD steps move the student towards the teacher
    versus = report["kd_vs_ce_only"]
    assert set(versus) == {"kl", "exact_match", "kd_beats_ce_only"}
    assert (
        versus["kl"]["kd"] == after["kl"]
        and versus["kl"]["ce_only"] == report["rows"]["student_ce_only"]["kl"]
    )
    # the cache: one complete teacher (the stale folder replaced), no temporary folder left behind
    data_work = (
        "tokenized",
        "validated",
    )  # the run's tokenized data shares the cache (easydistill/data/cache.py)
    assert [p.name for p in cache.iterdir() if p.name not in data_work] == [
        Path(report["teacher_cache"]).name
    ]
    assert (Path(report["teacher_cache"]) / TEACHER_MARKER).is_file()


def test_data_is_v1_jsonl_with_disjoint_held_out_records(first_run):
    _, workdir, _ = first_run
    train, heldout = (
        [json.loads(line) for line in (workdir / "data" / name).read_text().splitlines()]
        for name in ("train.jsonl", "heldout.jsonl")
    )
    assert len(train) == FAST.n_train and len(heldout) == FAST.n_heldout
    assert all(set(r) == {"instruction", "output"} for r in train + heldout)
    assert all(synthetic.answer(None, r["instruction"]) == r["output"] for r in train + heldout)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    # the students' copy: the same instructions, the documented share of outputs wrong (same length)
    distill = [json.loads(line) for line in (workdir / "data" / "distill.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in distill] == [r["instruction"] for r in train]
    wrong = [d for d, r in zip(distill, train) if d["output"] != r["output"]]
    assert (
        len(wrong)
        == round(FAST.student_label_noise * FAST.n_train)
        == read_report(workdir)["n_corrupted_labels"]
    )
    assert all(len(d["output"]) == len(synthetic.answer(None, d["instruction"])) for d in wrong)


def test_corrupt_is_seeded_and_exact():
    records = synthetic.make_records("add", 50, seed=3)
    once, n = quickstart.corrupt(records, 0.3, seed=7)
    assert n == 15 and once == quickstart.corrupt(records, 0.3, seed=7)[0]
    assert sum(a != b for a, b in zip(once, records)) == 15
    assert all(a["output"].isdigit() for a in once)
    assert quickstart.corrupt(records, 0.0, seed=7) == (records, 0)


def test_the_shipped_config_validates_once_the_inputs_exist(first_run, monkeypatch, capsys):
    from easydistill import validate
    from easydistill.cli import run

    raw = json.loads(CONFIG_PATH.read_text())
    assert (
        next(iter(raw)) == "$comment"
        and "python -m easydistill.kd.train --config configs/quickstart.json" in (raw["$comment"])
    )
    assert raw["training"]["overwrite_output_dir"] is True
    # The file's paths are relative to the repo root: validate it from a root whose runs/quickstart is ours.
    root, _, _ = first_run
    (root / "easydistill").symlink_to(REPO_ROOT / "easydistill", target_is_directory=True)
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        run(validate.main, ["--config", str(CONFIG_PATH)])
    assert exit_info.value.code == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "ok:" in out and "runs/quickstart/models/teacher" in out


def test_a_second_run_reuses_the_cached_teacher(first_run, monkeypatch, capsys):
    root, workdir, cache = first_run
    cached = Path(read_report(workdir)["teacher_cache"])
    stamp = (cached / TEACHER_MARKER).stat().st_mtime_ns, (cached / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("EASYDISTILL_CACHE", str(cache))
    capsys.readouterr()
    assert quickstart.main(["--fast", "--workdir", str(workdir), "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "reusing the cached teacher" in out and "training once" not in out
    assert stamp == (
        (cached / TEACHER_MARKER).stat().st_mtime_ns,
        (cached / "model.safetensors").stat().st_mtime_ns,
    )
    report = read_report(workdir)
    assert report["teacher_cached"] is True and report["kd_vs_ce_only"] is None
    assert "student_ce_only" not in report["rows"] and not (workdir / "student_ce_only").exists()
    assert [name for name in os.listdir(cache) if name not in ("tokenized", "validated")] == [cached.name]


@pytest.mark.slow
def test_the_full_quickstart_shows_kd_beating_ce_only(tmp_path, monkeypatch):
    """The demo's claim, on its default recipe (a fresh cache: the teacher is trained too, a few minutes on
    2 cores): after equal steps on the same noisy labels, the KD student is closer to the teacher (held-out KL)
    and right on more held-out records than the CE-only one, and nearly perfect itself."""
    monkeypatch.setenv("EASYDISTILL_CACHE", str(tmp_path / "cache"))
    workdir = tmp_path / "runs" / "quickstart"
    assert quickstart.main(["--workdir", str(workdir)]) == 0
    report = read_report(workdir)
    kd, ce = report["rows"]["student_kd"], report["rows"]["student_ce_only"]
    assert report["kd_vs_ce_only"]["kd_beats_ce_only"], report["kd_vs_ce_only"]
    assert kd["kl"] < 0.05 < ce["kl"] and kd["exact_match"] > ce["exact_match"] and kd["exact_match"] >= 0.99
    assert report["rows"]["teacher"]["exact_match"] == 1.0
    # the run's own report judged the same held-out records against the task, through the plug-in
    run_report = json.loads((workdir / "student_kd" / "report.json").read_text())
    assert "the synthetic task's right answer" in run_report["exact_match_basis"]
    assert run_report["evaluations"][-1]["exact_match"] == pytest.approx(kd["exact_match"], abs=0.01)
