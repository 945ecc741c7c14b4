"""Tokenising records into ids + labels, truncation, stats and the train/eval split."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass

from easydistill.data.records import load_records
from easydistill.data.render import render_segments
from easydistill.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "eval")  # batch["sample_split"] holds the index into this tuple


@dataclass
class TokenizedExample:
    sample_id: str
    input_ids: list[int]
    labels: list[int]  # input_ids with IGNORE_INDEX on every non-response token
    prompt_len: int  # number of leading masked tokens
    sample_index: int = -1  # position in its split, set by build_dataset; -1 = not in a dataset
    split: str = "train"  # which split sample_index counts in ("train" or "eval"), set by build_dataset
    messages: list[dict] | None = (
        None  # the record's messages (a cross-tokenizer teacher renders its own prompt)
    )


@dataclass
class DataStats:
    n_records: int = 0
    n_truncated: int = 0  # examples cut to max_length (kept or dropped)
    n_dropped: int = 0  # examples with no response token left after truncation
    n_response_tokens: int = 0  # label tokens over all kept examples
    max_len_seen: int = 0  # longest example in tokens, before truncation

    def summary(self) -> str:
        return (
            f"{self.n_records} records, {self.n_truncated} truncated, {self.n_dropped} dropped "
            f"(no response token left), {self.n_response_tokens} response tokens, "
            f"longest {self.max_len_seen} tokens"
        )


# ---------------------------------------------------------------- tokenisation


def _tokenize_with_labels(tokenizer, text: str, segments: list[tuple[int, int]]):
    """Tokenise `text` once; a token is a label iff its span starts inside a response segment.

    Tokenising the whole text keeps BPE merges across the prompt/response boundary exactly as the
    model will see them; a merged token that starts in the prompt stays masked.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels, seg = [], 0
        for tok, (start, _end) in zip(ids, enc["offset_mapping"]):
            while seg < len(segments) and start >= segments[seg][1]:
                seg += 1
            inside = seg < len(segments) and segments[seg][0] <= start < segments[seg][1]
            labels.append(tok if inside else IGNORE_INDEX)
        return ids, labels
    # Slow tokenizers have no offsets: tokenise piece by piece at the segment boundaries.
    cuts = sorted({0, len(text), *(b for s in segments for b in s)})
    ids, labels = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        is_response = any(s <= a and b <= e for s, e in segments)
        ids.extend(piece)
        labels.extend(piece if is_response else [IGNORE_INDEX] * len(piece))
    return ids, labels


def _tokenize_record(record, tokenizer, template_path, max_length):
    """(example or None when dropped, length before truncation, was truncated)."""
    if max_length is None or max_length <= 0:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}")
    text, segments = render_segments(record, tokenizer, template_path=template_path)
    ids, labels = _tokenize_with_labels(tokenizer, text, segments)
    full_len = len(ids)
    truncated = full_len > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None, full_len, truncated
    prompt_len = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    example = TokenizedExample(record["id"], ids, labels, prompt_len, messages=record["messages"])
    return example, full_len, truncated


def render_and_tokenize(record, tokenizer, *, template_path=None, max_length) -> TokenizedExample | None:
    """Token ids + labels of one record, left part kept; None when no response token survives."""
    return _tokenize_record(record, tokenizer, template_path, max_length)[0]


def tokenized_hash(input_ids) -> str:
    """Short stable hash of token ids, stored with precomputed teacher rows and checked on use."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=8).hexdigest()


def _split(records: list[dict], eval_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle of the sorted ids: independent of file order, the same on every run."""
    if not 0.0 <= eval_ratio < 1.0:
        raise UserError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0.0:
        return records, []
    if len(records) < 2:
        raise UserError(f"cannot split {len(records)} record(s) into train and eval; lower eval_ratio to 0")
    n_eval = min(len(records) - 1, max(1, round(len(records) * eval_ratio)))
    ids = sorted(r["id"] for r in records)
    random.Random(seed).shuffle(ids)
    eval_ids = set(ids[:n_eval])
    return [r for r in records if r["id"] not in eval_ids], [r for r in records if r["id"] in eval_ids]


def build_dataset(
    path, tokenizer, *, template_path=None, max_length, eval_ratio=0.0, eval_path=None, seed=42
) -> tuple[list[TokenizedExample], list[TokenizedExample], DataStats]:
    """Load, split and tokenise. `eval_path`, when given, is the eval set and `eval_ratio` is ignored."""
    records = load_records(path)
    if eval_path is not None:
        if eval_ratio:
            logger.warning("eval_path is set, so eval_ratio=%s is ignored", eval_ratio)
        train_records, eval_records = records, load_records(eval_path)
    else:
        train_records, eval_records = _split(records, eval_ratio, seed)
    stats = DataStats(n_records=len(train_records) + len(eval_records))
    dropped: list[str] = []

    def tokenize_all(recs: list[dict], split: str) -> list[TokenizedExample]:
        out = []
        for rec in recs:
            example, full_len, truncated = _tokenize_record(rec, tokenizer, template_path, max_length)
            stats.max_len_seen = max(stats.max_len_seen, full_len)
            stats.n_truncated += truncated
            if example is None:
                stats.n_dropped += 1
                dropped.append(rec["source"])
                continue
            example.sample_index, example.split = len(out), split
            stats.n_response_tokens += sum(t != IGNORE_INDEX for t in example.labels)
            out.append(example)
        return out

    train, evaluation = tokenize_all(train_records, "train"), tokenize_all(eval_records, "eval")
    if dropped:
        logger.warning(
            "dropped %d example(s) with no response token within max_length=%d, e.g. %s",
            len(dropped),
            max_length,
            ", ".join(dropped[:3]),
        )
    if not train:
        raise UserError(
            f"{path}: no training example left: all {len(train_records)} were dropped because "
            f"max_length={max_length} leaves no response token (longest example: {stats.max_len_seen})"
        )
    return train, evaluation, stats
