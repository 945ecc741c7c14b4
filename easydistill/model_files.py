"""What a model folder's files say, read as JSON: no torch, no transformers, nothing loaded."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def model_config(path: str | Path) -> dict:
    """The folder's config.json as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


def embedding_rows(path: str | Path) -> int | None:
    """Rows of the model's embedding matrix (config `vocab_size`; a multimodal config's text part)."""
    config = model_config(path)
    rows = config.get("vocab_size")
    if rows is None:
        rows = (config.get("text_config") or {}).get("vocab_size")
    return rows


# ---------------------------------------------------------------- tokenizer files

# The files that decide which id a token gets; byte-identical files mean one vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "tokenizer.model",
    "added_tokens.json",
    "tokenizer_config.json",
)


def same_tokenizer_files(a: str | Path, b: str | Path) -> bool:
    """True when two folders hold byte-identical tokenizer files (then their vocabularies are equal)."""
    for name in TOKENIZER_FILES:
        fa, fb = Path(a) / name, Path(b) / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return False
    return True


def tokenizer_vocab(path: str | Path) -> dict[str, int] | None:
    """token -> id as AutoTokenizer's `get_vocab()` gives it (added tokens included), from tokenizer.json (the
    `tokenizers` library) or vocab.json; None when the folder has only a sentencepiece model. Raises
    ValueError (or OSError) for a file that cannot be read."""
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as exc:  # the Rust parser's own error type
            raise ValueError(f"tokenizer.json: {exc}") from None
    elif (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    else:
        return None
    if (folder / "added_tokens.json").is_file():
        vocab.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for token_id, token in (config.get("added_tokens_decoder") or {}).items():
            vocab[token["content"]] = int(token_id)
    return vocab


# ---------------------------------------------------------------- weights: names and shapes from headers

MAX_HEADER_BYTES = 100 * 1024 * 1024


def _safetensors_header(file: Path) -> dict[str, list[int]]:
    """name -> shape of every tensor in a safetensors file, from its JSON header (8-byte length, then JSON)."""
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{file.name}: too short for a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{file.name}: not a safetensors file (header of {size} bytes)")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {name: list(info["shape"]) for name, info in header.items()}


def parameter_shapes(path: str | Path) -> dict[str, list[int]] | None:
    """name -> shape of every saved tensor, from model.safetensors or the shards its index names; None when
    the folder holds no safetensors weights. Reads headers only (a few KB per file)."""
    folder = Path(path)
    if (folder / "model.safetensors").is_file():
        return _safetensors_header(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        shapes.update(_safetensors_header(folder / shard))
    return shapes


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe")


def module_names(shapes: dict[str, list[int]], config: dict) -> tuple[list[str], list[str]]:
    """(modules with a 2-D weight that LoRA can wrap, every module with a parameter), full dotted names.

    Parameter names name their modules exactly (`model.layers.0.self_attn.q_proj.weight`). Embedding tables
    are 2-D too and are left out by name; a head tied to the embedding is not saved, so it is added back."""
    every, linear = set(), set()
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        parts = module.split(".")
        every.update(".".join(parts[: i + 1]) for i in range(len(parts)) if module)
        if leaf == "weight" and len(shape) == 2 and not _is_embedding(module):
            linear.add(module)
    tied = config.get("tie_word_embeddings", True)
    if tied and not any(m.rsplit(".", 1)[-1] == "lm_head" for m in every):
        every.add("lm_head")
        linear.add("lm_head")
    return sorted(linear), sorted(every)


def matches(module: str, target: str) -> bool:
    """PEFT's rule for a target_modules / modules_to_save entry: the full name, or a dotted suffix of it."""
    return module == target or module.endswith("." + target)
