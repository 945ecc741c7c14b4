"""Shared fixtures: tiny models built offline once per test session.

The folders are shared by every test of the session: treat them as read-only (copy one to change it).
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers / datasets: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy 2-core machine spin-wait
# each other into 100x slower matmuls; one thread keeps the suite's timing stable.
torch.set_num_threads(1)

# Text unlike the synthetic corpus, so the tokenizer trained on it has other merges and another size.
OTHER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to match a large teacher.",
    "Hello world! Numbers like 12345 and words like reward, drawer, level.",
    "user assistant system: please answer briefly.",
]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenized data and validation stamps (easydistill/data/cache.py) of this session, not in ~/.cache;
    processes the tests start inherit it."""
    folder = tmp_path_factory.mktemp("easydistill-cache")
    os.environ["EASYDISTILL_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir), Qwen2 architecture, one tokenizer, teacher rows padded to 64."""
    from examples.tiny_models import build_pair

    return build_pair(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir), Llama architecture, otherwise as `tiny_pair`."""
    from examples.tiny_models import build_pair

    return build_pair(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="module")
def student(tiny_pair):
    """The tiny pair's student loaded in eval mode, one per test module (a test may change it and restore it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    """The tiny pair's shared tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="session")
def mismatched_tokenizer_model(tmp_path_factory) -> Path:
    """A Qwen2 model folder whose tokenizer differs from `tiny_pair`'s (other text, other vocab size)."""
    from examples.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer(OTHER_TEXT * 5, vocab_size=300)
    return build_model(tmp_path_factory.mktemp("tiny-mismatched") / "model", tokenizer=tokenizer, seed=7)
