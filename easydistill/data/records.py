"""Reading data files (JSON, JSONL, parquet) into normalised chat records with sample ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from easydistill.errors import UserError

ROLES = ("system", "user", "assistant")
TEXT_FIELDS = ("instruction", "input", "output", "system", "prompt", "completion")


# ---------------------------------------------------------------- reading files


def _read_items(path) -> Iterator[tuple[str, object]]:
    """Yield (source, raw item) pairs; source is `file:line`, `file:line (item i)` or `file row i`.

    Items are parsed lazily, so the first bad record is reported even if a later one is malformed. JSONL and
    parquet files are read a line (a batch of rows) at a time, so memory does not grow with the file; a JSON
    list is one document and is read whole.
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
    if suffix == ".jsonl":
        return _read_jsonl(p)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from None
    return _read_json_list(p, text)


def _unreadable(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _read_jsonl(p: Path) -> Iterator[tuple[str, object]]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            except (RecursionError, ValueError) as e:  # nested thousands deep; an integer of 4300+ digits
                raise UserError(f"{p}:{lineno}: cannot be read as JSON ({_unreadable(e)})") from None
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
            except (RecursionError, ValueError) as e:
                raise fail(i, f"cannot be read as JSON ({_unreadable(e)})") from None
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
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{p}: cannot read parquet file: {e}") from None
    return _parquet_rows(p, batches)


def _parquet_rows(p: Path, batches) -> Iterator[tuple[str, object]]:
    index = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group shows only when it is read
            raise UserError(f"{p}: cannot read parquet file: {e}") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield f"{p} row {index}", row
            index += 1


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


def iter_records(path, prompts: bool = False) -> Iterator[dict]:
    """Records of `path` one at a time, checked as they come (see `load_records`); memory does not grow with
    the file except by each record's id (kept to refuse a duplicate)."""
    first_family: tuple[str, str] | None = None
    seen_ids: dict[str, int] = {}
    index = -1
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
            first = next(src for i, (src, _) in enumerate(_read_items(path)) if i == seen_ids[sample_id])
            raise UserError(f"duplicate sample id {sample_id!r} at {first} and {source}")
        seen_ids[sample_id] = index
        yield {
            "id": sample_id,
            "messages": messages,
            "source": source,
            "content_hash": _content_hash(messages),
        }
    if index < 0:
        raise UserError(f"{path}: the file holds no records")


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
    return list(iter_records(path, prompts=False))


def load_prompts(path) -> list[dict]:
    """Prompts (v1 instruction_path) as {"id", "messages", ...}, with no assistant turn at the end.

    Accepts a list of strings or prompt-only records; labeled records are accepted too and their
    response is dropped, so the teacher can answer the same prompts again.
    """
    return list(iter_records(path, prompts=True))


def with_system_prompt(prompts: list[dict], system: str | None) -> list[dict]:
    """Prompts as the teacher answers them: `inference.system_prompt` first where a prompt has no system turn."""
    if not system:
        return prompts
    return [
        p
        if p["messages"][0]["role"] == "system"
        else {**p, "messages": [{"role": "system", "content": system}, *p["messages"]]}
        for p in prompts
    ]


def validate_data_file(path, *, prompts: bool = False) -> int:
    """Parse and check every record of `path` without a tokenizer; return the record count.

    A file checked before (same path, size and modification time) is not read again (data/cache.py)."""
    from easydistill.data.cache import read_validated, write_validated

    known = read_validated(path, prompts)
    if known is not None:
        return known
    count = sum(1 for _ in iter_records(path, prompts=prompts))
    write_validated(path, prompts, count)
    return count
