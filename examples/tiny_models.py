"""Tiny, deterministic Qwen2- and Llama-architecture checkpoints built offline in seconds.

    python -m examples.tiny_models --out runs/tiny [--arch qwen2|llama] [--seed 0]

builds a teacher and a student sharing one byte-level BPE tokenizer (trained here on
`synthetic.corpus()`) into OUT/teacher and OUT/student, and prints the two paths. Both folders are
ordinary `save_pretrained` folders (safetensors, tokenizer, chat template, generation config), so
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load them with
HF_HUB_OFFLINE=1. Same arguments, same bytes: weights come from a seeded RNG that does not touch the
caller's global torch RNG state.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from easydistill.models import quiet_loading
from examples import synthetic

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
MAX_POSITIONS = 1024  # v1 files carry max_length 512; position tables of RoPE models hold no weights
# Qwen2's pre-tokenizer split: digits one at a time, letters grouped, punctuation apart.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# ChatML as Qwen writes it, without Qwen's default system prompt (it would triple every sequence).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
ARCHS = ("qwen2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
TEACHER = {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
STUDENT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


def build_tokenizer(texts=None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` (default: `synthetic.corpus()`), with ChatML.

    `vocab_size` is an upper bound: training stops early when no pair is left to merge (the default
    corpus gives 285 tokens). Ids 0, 1, 2 are <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos).
    Training is deterministic: the same texts give the same vocabulary and merges in every process.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = synthetic.corpus() if texts is None else list(texts)
    bpe = Tokenizer(models.BPE())
    # No normalizer (Qwen uses NFC): decode(encode(text)) must give back any text byte for byte.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _config(
    arch: str,
    *,
    rows: int,
    tokenizer,
    hidden_size,
    num_layers,
    num_heads,
    num_kv_heads,
    intermediate_size,
    tie_word_embeddings,
):
    from transformers import LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    common = {
        "vocab_size": rows,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": tie_word_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_model(
    out_dir,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tokenizer=None,
    padded_vocab: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A randomly initialised Qwen2ForCausalLM or LlamaForCausalLM saved with its tokenizer in `out_dir`.

    The embedding matrix has `padded_vocab` rows (default `len(tokenizer)`); more rows than tokens is
    what Qwen checkpoints ship. Same arguments give the same files, byte for byte.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    rows = len(tokenizer) if padded_vocab is None else padded_vocab
    if rows < len(tokenizer):
        raise ValueError(f"padded_vocab={rows} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    config = _config(
        arch,
        rows=rows,
        tokenizer=tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally: leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],  # as Qwen instruct models do
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        do_sample=False,
        max_new_tokens=16,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_pair(root, *, arch: str = "qwen2", tokenizer=None, seed: int = 0) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) under `root`, sharing one tokenizer.

    The student has `len(tokenizer)` embedding rows; the teacher is larger and pads its rows up to a
    multiple of 64 (always more rows than the student), so the same-tokenizer-different-padding path
    is exercised by every test that uses the pair.
    """
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    root = Path(root)
    teacher_rows = (len(tokenizer) // 64 + 1) * 64
    teacher = build_model(
        root / "teacher", arch=arch, tokenizer=tokenizer, padded_vocab=teacher_rows, seed=seed, **TEACHER
    )
    student = build_model(root / "student", arch=arch, tokenizer=tokenizer, seed=seed + 1, **STUDENT)
    return teacher, student


def point_config_at(raw: dict, teacher, student, data, output_dir, repo_root=None) -> dict:
    """A config dict (a shipped one, say) with its models, training data and output_dir replaced: the
    student folder, every model teacher's folder (a self-teacher stays), `data` as labeled_path (an eval file
    becomes a quarter of `data`, so that evaluation settings keep their eval data), a relative template
    resolved against `repo_root`. Everything else is kept as it was."""
    raw["models"]["student"] = str(student)
    t = raw["models"].get("teacher")
    if isinstance(t, str) and t != "self":
        raw["models"]["teacher"] = str(teacher)
    elif isinstance(t, list):
        raw["models"]["teacher"] = [
            {**e, "path": str(teacher)} if isinstance(e, dict) else str(teacher) for e in t
        ]
    raw["dataset"]["labeled_path"] = str(data)
    if raw["dataset"].pop("eval_path", None):
        raw["dataset"]["eval_ratio"] = 0.25
    if raw["dataset"].get("template") and repo_root is not None:
        raw["dataset"]["template"] = str(Path(repo_root) / raw["dataset"]["template"])
    raw["training"]["output_dir"] = str(output_dir)
    return raw


def default_cache_root() -> Path:
    return Path(os.environ.get("EASYDISTILL_CACHE") or Path.home() / ".cache" / "easydistill")


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.tiny_models", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder to write teacher/ and student/ into")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    teacher, student = build_pair(args.out, arch=args.arch, seed=args.seed)
    for name, path in (("teacher", teacher), ("student", student)):
        print(f"{name}: {path} ({_folder_size(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
