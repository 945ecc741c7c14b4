"""Secrets in a config (api_key, a password in base_url, hub_token) appear in nothing a run writes."""

from __future__ import annotations

import importlib.util
import os

from kd_helpers import kd_config, train, write_records

from easydistill.redact import REDACTED, redact, redact_url

API_KEY, PASSWORD, HUB_TOKEN = "sk-live-API-KEY-1234", "pa55-WORD-5678", "hf_HUB_TOKEN_9012"


def test_redaction_rules():
    assert (
        redact_url(f"https://alice:{PASSWORD}@api.example.com/v1")
        == f"https://alice:{REDACTED}@api.example.com/v1"
    )
    assert redact_url("https://api.example.com/v1") == "https://api.example.com/v1"
    assert redact_url("not a url: a:b@c") == "not a url: a:b@c"
    data = {
        "inference": {"api_key": API_KEY, "max_new_tokens": 8},
        "training": {"hub_token": HUB_TOKEN, "include_num_input_tokens_seen": "all", "output_dir": "x"},
        "nested": [{"client_secret": "s", "password": "p", "token": "t"}],
    }
    out = redact(data)
    assert out["inference"] == {"api_key": REDACTED, "max_new_tokens": 8}
    assert out["training"] == {
        "hub_token": REDACTED,
        "include_num_input_tokens_seen": "all",
        "output_dir": "x",
    }
    assert out["nested"] == [{"client_secret": REDACTED, "password": REDACTED, "token": REDACTED}]
    assert data["inference"]["api_key"] == API_KEY, "the input is not changed"


def test_no_secret_in_anything_a_run_writes(tiny_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    data = write_records(tmp_path / "train.jsonl", n=8)
    logger = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    raw = kd_config(
        tiny_pair,
        data,
        tmp_path / "out",
        inference={"api_key": API_KEY, "base_url": f"https://alice:{PASSWORD}@api.example.com/v1"},
        training={"hub_token": HUB_TOKEN, "save_strategy": "steps", "save_steps": 1, "report_to": logger},
        lora={"save_merged_model": True},
    )
    train(raw)
    printed = "".join(capsys.readouterr())
    written = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert any(p.name == "training_args.bin" for p in written) and any(
        p.name == "easydistill_config.json" for p in written
    )
    for secret in (API_KEY, PASSWORD, HUB_TOKEN):
        assert secret not in printed
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert leaks == [], f"{secret} written to {leaks}"
    assert os.environ["HF_TOKEN"] == HUB_TOKEN, (
        "the token still reaches the hub client, through the environment"
    )
    copy = (tmp_path / "out/easydistill_config.json").read_text()
    assert f"alice:{REDACTED}@api.example.com" in copy and copy.count(REDACTED) == 3
