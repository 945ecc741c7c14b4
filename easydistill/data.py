"""Data: user files → normalised chat records → token ids + labels, plus collation.

One direction: `load_records` (formats, shapes, ids) → `render_and_tokenize` (template, label
masking, truncation) → `build_dataset` (stats, train/eval split) → `TokenizedDataset` +
`KDCollator` for the trainer. Every problem a user can cause raises `UserError` naming
`file:line` (JSONL, JSON list) or `file row N` (parquet). See docs/data.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from easydistill.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "eval")  # batch["sample_split"] holds the index into this tuple
ROLES = ("system", "user", "assistant")
TEXT_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion")
V1_TEMPLATE = Path(__file__).parent / "templates" / "chatml_v1.jinja"


@dataclass
class TokenizedExample:
    sample_id: str
    input_ids: list[int]
    labels: list[int]  # input_ids with IGNORE_INDEX on every non-response token
    prompt_len: int  # number of leading masked tokens
    sample_index: int = -1  # position in its split, set by build_dataset; -1 = not in a dataset
    split: str = "train"  # which split sample_index counts in ("train" or "eval"), set by build_dataset


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


# ---------------------------------------------------------------- reading files


def _read_items(path) -> Iterator[tuple[str, object]]:
    """Yield (source, raw item) pairs; source is `file:line`, `file:line (item i)` or `file row i`.

    Items are parsed lazily, so the first bad record is reported even if a later one is malformed.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl", ".parquet"):
        raise UserError(f"{p}: unknown data file extension {p.suffix!r}; use .json, .jsonl or .parquet")
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if not p.is_file():
        raise UserError(f"data path is not a file: {p}")
    if suffix == ".parquet":
        return _read_parquet(p)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from None
    return _read_jsonl(p, text) if suffix == ".jsonl" else _read_json_list(p, text)


def _read_jsonl(p: Path, text: str) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        yield f"{p}:{lineno}", obj


def _read_json_list(p: Path, text: str) -> Iterator[tuple[str, object]]:
    """Parse a top-level JSON list item by item, so each item knows the line it starts on."""
    decoder = json.JSONDecoder()
    n = len(text)
    counted_pos, counted_line = 0, 1

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(pos: int, msg: str) -> UserError:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return UserError(f"{p}:{line}:{col}: {msg}")

    i = skip_ws(0)
    if i >= n:
        raise fail(i, "empty file; expected a JSON list of records")
    if text[i] != "[":
        kind = "an object" if text[i] == "{" else "not a list"
        raise fail(i, f"expected a JSON list of records, got {kind} (one object per line belongs in .jsonl)")
    index = 0
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            counted_line += text.count("\n", counted_pos, i)  # positions only grow: count incrementally
            counted_pos = i
            yield f"{p}:{counted_line} (item {index})", obj
            index += 1
            i = skip_ws(end)
            if i < n and text[i] == ",":
                i = skip_ws(i + 1)
            elif i < n and text[i] == "]":
                i += 1
                break
            else:
                raise fail(i, "invalid JSON: expected ',' or ']' after a list item")
    if skip_ws(i) < n:
        raise fail(skip_ws(i), "invalid JSON: extra data after the closing ']'")


def _read_parquet(p: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{p}: cannot read parquet file: {e}") from None
    return ((f"{p} row {i}", row) for i, row in enumerate(rows))


# ---------------------------------------------------------------- shapes and normalisation


def _shape_family(obj, source: str) -> str:
    if isinstance(obj, str):
        return "string"
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a JSON object (record), got {type(obj).__name__}")
    found = [k for k in ("messages", "instruction", "prompt") if obj.get(k) is not None]
    if len(found) > 1:
        raise UserError(f"{source}: record has both {found[0]!r} and {found[1]!r}; use one shape per record")
    if not found:
        raise UserError(
            f"{source}: unrecognised record with keys {sorted(obj)}; expected 'instruction' (+ 'output'), "
            "'messages', or 'prompt' (+ 'completion')"
        )
    return found[0]


def _normalise(obj, family: str, source: str) -> list[dict]:
    """Turn one raw item into a list of {"role", "content"} messages (assistant turns = responses)."""
    if family == "string":
        return [{"role": "user", "content": obj}]
    rec = {k: v for k, v in obj.items() if v is not None}  # parquet fills absent columns with null
    for key in TEXT_FIELDS:
        if key in rec and not isinstance(rec[key], str):
            raise UserError(f"{source}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if family == "messages":
        return _check_messages(rec["messages"], source)
    if family == "instruction":
        user, response = rec["instruction"], rec.get("output")
        if rec.get("input"):
            user = f"{user}\n{rec['input']}"
    else:
        user, response = rec["prompt"], rec.get("completion")
    messages = [{"role": "system", "content": rec["system"]}] if "system" in rec else []
    messages.append({"role": "user", "content": user})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _check_messages(messages, source: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{source}: messages[{j}] needs a 'role' in {list(ROLES)}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{source}: messages[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _content_hash(messages: list[dict]) -> str:
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _load(path, prompts: bool) -> list[dict]:
    records: list[dict] = []
    first_family: tuple[str, str] | None = None
    seen_ids: dict[str, str] = {}
    for index, (source, obj) in enumerate(_read_items(path)):
        family = _shape_family(obj, source)
        if first_family is None:
            first_family = (family, source)
        elif family != first_family[0]:
            raise UserError(
                f"{source}: record shape {family!r} differs from {first_family[0]!r} at {first_family[1]}; "
                "use one shape per file"
            )
        messages = _normalise(obj, family, source)
        if prompts:
            while messages and messages[-1]["role"] == "assistant":  # labeled input: keep the prompt
                messages.pop()
            if not messages or messages[-1]["role"] != "user":
                raise UserError(f"{source}: a prompt must end with a user turn")
        else:
            if family == "string":
                raise UserError(f"{source}: a bare string is a prompt, not a labeled record (no response)")
            if not any(m["role"] == "assistant" for m in messages):
                what = {"instruction": "'output'", "prompt": "'completion'"}.get(family, "assistant turn")
                raise UserError(
                    f"{source}: record has no {what}; labeled data needs the response "
                    "(prompt-only files belong in dataset.instruction_path)"
                )
        sample_id = _sample_id(obj, index, source)
        if sample_id in seen_ids:
            raise UserError(f"duplicate sample id {sample_id!r} at {seen_ids[sample_id]} and {source}")
        seen_ids[sample_id] = source
        records.append(
            {"id": sample_id, "messages": messages, "source": source, "content_hash": _content_hash(messages)}
        )
    if not records:
        raise UserError(f"{path}: the file holds no records")
    return records


def _sample_id(obj, index: int, source: str) -> str:
    """The record's own "id" if it has one, else its 0-based position among the file's records."""
    raw = obj.get("id") if isinstance(obj, dict) else None
    if raw is None:
        return str(index)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise UserError(f"{source}: 'id' must be a string or an integer, got {type(raw).__name__}")
    return str(raw)


def load_records(path) -> list[dict]:
    """Labeled records as {"id", "messages", "source", "content_hash"}; every record has a response."""
    return _load(path, prompts=False)


def load_prompts(path) -> list[dict]:
    """Prompts (v1 instruction_path) as {"id", "messages", ...}, with no assistant turn at the end.

    Accepts a list of strings or prompt-only records; labeled records are accepted too and their
    response is dropped, so the teacher can answer the same prompts again.
    """
    return _load(path, prompts=True)


def validate_data_file(path, *, prompts: bool = False) -> int:
    """Parse and check every record of `path` without a tokenizer; return the record count."""
    return len(_load(path, prompts=prompts))


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _load_template(path: str):
    import jinja2

    p = Path(path)
    if not p.is_file():
        raise UserError(f"template file not found: {p}")
    # Default Environment on purpose: like v1, the template file's final newline is not rendered.
    env = jinja2.Environment()
    source = p.read_text(encoding="utf-8")
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{p}:{e.lineno}: template syntax error: {e.message}") from None
    return template, bool(_READS_SYSTEM.search(source))


# message['system'], message["system"], message.system or message.get('system')
_READS_SYSTEM = re.compile(r"""message\s*(\[\s*['"]system['"]\s*\]|\.system\b|\.get\(\s*['"]system['"])""")


def _v1_message(record: dict, template_path: str) -> dict:
    messages = record["messages"]
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if body not in (["user"], ["user", "assistant"]):
        raise UserError(
            f"{record['source']}: template {template_path} renders single-turn records only "
            f"([system], user, assistant); this record has roles {roles}. Remove dataset.template "
            "to use the tokenizer's chat template for multi-turn chats"
        )
    message = {"content": messages[roles.index("user")]["content"]}
    if body[-1] == "assistant":
        message["output"] = messages[-1]["content"]
    if roles[0] == "system":
        message["system"] = messages[0]["content"]
    return message


def _render_v1(record: dict, template_path, with_output: bool) -> str:
    import jinja2

    template, uses_system = _load_template(str(template_path))
    message = _v1_message(record, str(template_path))
    if "system" in message and not uses_system:
        raise UserError(
            f"{record['source']}: record has a system prompt but template {template_path} never reads "
            "message['system']; it would be silently dropped"
        )
    try:
        return template.render(message=message, add_generation_prompt=not with_output, add_output=with_output)
    except jinja2.TemplateError as e:
        raise UserError(f"{template_path}: cannot render {record['source']}: {e}") from None


def _render_chat(tokenizer, messages: list[dict], source: str, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; set dataset.template to a Jinja file "
            f"(e.g. {V1_TEMPLATE}) or use a tokenizer that ships one"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja errors, raise_exception() in templates, role checks
        raise UserError(f"{source}: the tokenizer's chat template failed: {e}") from None
    return text


def _not_prefix(source: str, which: str) -> UserError:
    return UserError(
        f"{source}: {which} does not render the prompt as a prefix of the full text, so the response "
        "cannot be located; fix the template so prompt + response == full text"
    )


def render_prompt(record: dict, tokenizer=None, *, template_path=None) -> str:
    """The prompt text a model continues from (generation prompt on), without any response."""
    messages = list(record["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    prompt_record = {**record, "messages": messages}
    if template_path is not None:
        return _render_v1(prompt_record, template_path, with_output=False)
    return _render_chat(tokenizer, messages, record["source"], generation_prompt=True)


def render_segments(record: dict, tokenizer=None, *, template_path=None) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans [start, end) of every response in it."""
    source = record["source"]
    if template_path is not None:
        prompt = _render_v1(record, template_path, with_output=False)
        full = _render_v1(record, template_path, with_output=True)
        if not full.startswith(prompt):
            raise _not_prefix(source, f"template {template_path}")
        return full, [(len(prompt), len(full))]
    messages = record["messages"]
    full = _render_chat(tokenizer, messages, source, generation_prompt=False)
    segments = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The span of turn i is what rendering turn i adds after the generation prompt.
        prompt = _render_chat(tokenizer, messages[:i], source, generation_prompt=True)
        upto = full if i == len(messages) - 1 else _render_chat(tokenizer, messages[: i + 1], source, False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise _not_prefix(source, "the tokenizer's chat template")
        segments.append((len(prompt), len(upto)))
    return full, segments


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
    return TokenizedExample(record["id"], ids, labels, prompt_len), full_len, truncated


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


# ---------------------------------------------------------------- torch side


class TokenizedDataset(torch.utils.data.Dataset):
    """Wraps a list of TokenizedExample; item i carries `sample_index = i` for teacher-row lookup.

    Train and eval examples are numbered in their own split, so each item also carries `sample_split`
    (0 train, 1 eval: the index into SPLITS, from the examples' `split`): (split, index) names one sample.

    With the Hugging Face Trainer set `remove_unused_columns=False`: otherwise it strips
    `sample_index` (not a forward() argument) before collation, and KDCollator refuses the batch.
    """

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "sample_index": i,
            "sample_split": SPLITS.index(ex.split),
        }

    def sample_id(self, i: int) -> str:
        return self.examples[i].sample_id


class KDCollator:
    """Right-pads a batch: input_ids / attention_mask / labels (B, L), sample_index and sample_split (B,)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("KDCollator needs a pad_token_id (use the eos id if the tokenizer has no pad)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _row(feature) -> tuple[list[int], list[int], int, int]:
        if isinstance(feature, TokenizedExample):
            return feature.input_ids, feature.labels, feature.sample_index, SPLITS.index(feature.split)
        if not isinstance(feature, Mapping):
            raise TypeError(
                f"KDCollator expects TokenizedExample or dict items, got {type(feature).__name__}"
            )
        if "sample_index" not in feature:
            raise ValueError(
                "batch item has no 'sample_index'; with the Hugging Face Trainer set "
                "remove_unused_columns=False so it keeps the column teacher rows are looked up by"
            )
        if "labels" not in feature:
            raise ValueError("batch item has no 'labels'; KDCollator never trains on unmasked prompts")
        ids = torch.as_tensor(feature["input_ids"]).tolist()
        labels = torch.as_tensor(feature["labels"]).tolist()
        return ids, labels, int(feature["sample_index"]), int(feature.get("sample_split", 0))

    def __call__(self, features) -> dict[str, torch.Tensor]:
        rows = [self._row(f) for f in features]
        if not rows:
            raise ValueError("KDCollator got an empty batch")
        length = max(len(ids) for ids, *_ in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, labs, *_) in enumerate(rows):
            if len(labs) != len(ids):
                raise ValueError(f"batch item {b}: {len(labs)} labels for {len(ids)} input ids")
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
            labels[b, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_index": torch.tensor([row[2] for row in rows], dtype=torch.long),
            "sample_split": torch.tensor([row[3] for row in rows], dtype=torch.long),
        }
