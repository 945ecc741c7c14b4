"""Tokenising records into ids + labels, truncation (by characters first, then by tokens), stats, the split.

A record is cut by characters before it is rendered and tokenized: no content longer than
`char_budget(tokenizer, max_length)` can change the first max_length tokens (each token covers at most as many
characters as the longest vocabulary entry; the budget is twice what max_length tokens can cover), so a
50 MB record costs what a record of that budget costs, and the kept tokens are the same as without the cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import weakref
from dataclasses import dataclass

from easydistill.data.render import render_segments
from easydistill.errors import UserError

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
    n_clipped: int = 0  # records cut by characters before tokenizing (far longer than max_length)
    n_dropped: int = 0  # examples with no response token left after truncation
    n_response_tokens: int = 0  # label tokens over all kept examples
    max_len_seen: int = 0  # longest example in tokens, before truncation (after the character cut)

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


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def char_budget(tokenizer, max_length: int) -> int | None:
    """Characters of a message that can matter for the first max_length tokens, with a 2x margin (None: the
    tokenizer does not list its vocabulary, so nothing is cut)."""
    try:
        longest = _LONGEST_TOKEN.get(tokenizer)
    except TypeError:
        longest = None
    if longest is None:
        try:
            longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        except (AttributeError, NotImplementedError, TypeError):
            return None
        with contextlib.suppress(
            TypeError
        ):  # a tokenizer that cannot be weakly referenced: computed each time
            _LONGEST_TOKEN[tokenizer] = longest
    return 2 * (max_length + 1) * max(longest, 1) + 1024


def _clip(record: dict, budget: int | None) -> tuple[dict, bool]:
    """The record with every message content cut to `budget` characters; whether anything was cut."""
    if budget is None or all(len(m["content"]) <= budget for m in record["messages"]):
        return record, False
    messages = [{**m, "content": m["content"][:budget]} for m in record["messages"]]
    return {**record, "messages": messages}, True


def tokenize_record(record, tokenizer, template_path, max_length, budget=None):
    """(example or None when dropped, length in tokens before truncation, truncated, clipped by characters)."""
    if max_length is None or max_length <= 0:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}")
    record, clipped = _clip(record, budget)
    text, segments = render_segments(record, tokenizer, template_path=template_path)
    ids, labels = _tokenize_with_labels(tokenizer, text, segments)
    full_len = len(ids)
    truncated = full_len > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None, full_len, truncated, clipped
    prompt_len = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    example = TokenizedExample(record["id"], ids, labels, prompt_len, messages=record["messages"])
    return example, full_len, truncated, clipped


def render_and_tokenize(record, tokenizer, *, template_path=None, max_length) -> TokenizedExample | None:
    """Token ids + labels of one record, left part kept; None when no response token survives."""
    budget = char_budget(tokenizer, max_length) if max_length and max_length > 0 else None
    return tokenize_record(record, tokenizer, template_path, max_length, budget)[0]


def tokenized_hash(input_ids) -> str:
    """Short stable hash of token ids, stored with precomputed teacher rows and checked on use."""
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=8).hexdigest()


def eval_ids(ids: list[str], eval_ratio: float, seed: int) -> set[str]:
    """The ids held out for evaluation: a seeded shuffle of the sorted ids, independent of file order."""
    if not 0.0 <= eval_ratio < 1.0:
        raise UserError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0.0:
        return set()
    if len(ids) < 2:
        raise UserError(f"cannot split {len(ids)} record(s) into train and eval; lower eval_ratio to 0")
    n_eval = min(len(ids) - 1, max(1, round(len(ids) * eval_ratio)))
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    return set(shuffled[:n_eval])
