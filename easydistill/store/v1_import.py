"""Import of EasyDistill v1 teacher-logits files into a top-k store, so v1 users keep what they computed.

    python -m easydistill.kd.infer --config x.json --import-v1 data/logits.json
    # or "dataset": {"logits_path": "data/logits.json"}: a file is converted on first use into
    # data/logits.json.store/ (dataset.logits_format "auto" or "easydistill_v1")

A v1 file is JSONL: line i belongs to the i-th record of dataset.labeled_path (file order) and holds a list with
one object per response token, mapping token ids (strings) to probabilities (the teacher's top-k, not
renormalised; vLLM may add the sampled token as a k+1-th entry).

Alignment. Row j is the distribution the teacher drew response token j from, so it is stored for the
position whose logits predict response token j: the j-th label position after the causal shift (the first
row goes to the last prompt position). v1's own trainer placed row j at the position *of* token j, whose logits
predict token j+1: every row one position late. Rows past the label positions (truncation) are dropped; label
positions without a row (e.g. an end-of-turn token the teacher never scored) get an empty row, all mass in the
tail bucket, which contributes exactly 0 to every divergence. The token at each label position should be
among its row's ids; when fewer than half are, the file does not describe these records and the import stops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from easydistill.data import IGNORE_INDEX, load_records, tokenized_hash
from easydistill.errors import UserError
from easydistill.store.topk import StoreWriter, sample_list, vocab_width

MIN_LABEL_HITS = 0.5  # below this share of label tokens found in their rows, the file is for other data
CHECK_AFTER = 2000  # label positions converted before the share is checked (then after every line)


def _rows(line: str, where: str) -> list[dict]:
    try:
        rows = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(
            f"{where}: expected a list of {{token id: probability}} objects (one per response token)"
        )
    return rows


def _top_k(lines_path: Path) -> int:
    """Slots per row: the most entries any row of the first line has (later rows keep their largest)."""
    with open(lines_path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise UserError(f"{lines_path}: empty v1 logits file")
    return max((len(r) for r in _rows(first, f"{lines_path}:1")), default=1) or 1


def convert_rows(rows: list[dict], n_positions: int, top_k: int, width: int, where: str):
    """v1 rows -> (ids (n, k) int64 with -1 empty, log_probs (n, k) fp32, tail (n,) fp32) for n label positions."""
    ids = np.full((n_positions, top_k), -1, dtype=np.int64)
    log_probs = np.full((n_positions, top_k), -np.inf, dtype=np.float32)
    tail = np.zeros(n_positions, dtype=np.float32)  # empty row: all mass in the tail
    for j, row in enumerate(rows[:n_positions]):
        try:
            pairs = sorted(((float(p), int(t)) for t, p in row.items()), reverse=True)
        except (TypeError, ValueError):
            raise UserError(f"{where}: row {j}: keys must be token ids and values probabilities") from None
        kept = [(p, t) for p, t in pairs if 0 <= t < width and p > 0][:top_k]
        if any(p < 0 or p > 1 + 1e-6 or not math.isfinite(p) for p, _ in pairs):
            raise UserError(f"{where}: row {j}: probabilities must lie in [0, 1]")
        for slot, (p, t) in enumerate(kept):
            ids[j, slot], log_probs[j, slot] = t, math.log(p)
        rest = 1.0 - sum(p for p, _ in kept)
        tail[j] = math.log(rest) if rest > 1e-12 else -np.inf
    return ids, log_probs, tail


def import_v1_file(
    cfg, v1_file, store, train, evaluation, *, teacher_path=None, shard_bytes=None, log=print
) -> Path:
    """Convert `v1_file` into a store at `store` for the examples training will see.

    A file that fails a check leaves nothing behind (no partial store to resume wrongly).
    """

    v1_file = Path(v1_file)
    if not v1_file.is_file():
        raise UserError(f"{v1_file}: no such EasyDistill v1 logits file")
    records = load_records(cfg.dataset.labeled_path)
    if cfg.dataset.eval_path:
        log(
            f"note: {v1_file} covers dataset.labeled_path only; eval_path examples get no teacher rows (no KD term)"
        )
        evaluation = []
    examples = {
        ex.sample_id: (split, ex) for split, exs in (("train", train), ("eval", evaluation)) for ex in exs
    }
    teacher_rows = None
    if teacher_path and Path(teacher_path, "config.json").is_file():
        from easydistill.model_files import embedding_rows

        teacher_rows = embedding_rows(teacher_path)
    width, top_k = vocab_width(cfg, teacher_rows), _top_k(v1_file)
    writer = StoreWriter(
        store,
        top_k=top_k,
        vocab_width=width,
        samples=sample_list(train, evaluation),
        source=f"easydistill_v1:{v1_file}",
        shard_bytes=shard_bytes,
    )
    stats = {"positions": 0, "hits": 0, "missing": 0}
    try:
        _convert(cfg, v1_file, records, examples, writer, top_k, width, stats)
    except UserError:
        writer.abandon()  # a crash keeps the partial store to resume; a refused file leaves nothing
        raise
    positions, hits, missing = stats["positions"], stats["hits"], stats["missing"]
    log(
        f"v1 import: {positions} positions with rows ({100 * hits / max(positions, 1):.1f}% hold their label token), "
        f"{missing} label positions without a row (KD 0 there)"
    )
    return writer.finish()


def _convert(cfg, v1_file: Path, records, examples, writer, top_k: int, width: int, stats: dict) -> None:
    from tqdm.auto import tqdm

    n_lines = 0
    with open(v1_file, encoding="utf-8") as f, tqdm(total=len(records), desc="v1 logits") as bar:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if n_lines >= len(records):
                raise UserError(
                    f"{v1_file}:{lineno}: more lines than the {len(records)} records of {cfg.dataset.labeled_path}"
                )
            sample_id = records[n_lines]["id"]
            n_lines += 1
            bar.update(1)
            split, ex = examples.get(sample_id, (None, None))
            if ex is None or writer.done(split, sample_id):
                continue  # dropped by truncation or max_samples, or converted before an interruption
            targets = np.array([t for t in ex.labels[1:] if t != IGNORE_INDEX])  # label tokens, in order
            rows = _rows(line, f"{v1_file}:{lineno}")
            ids, log_probs, tail = convert_rows(rows, len(targets), top_k, width, f"{v1_file}:{lineno}")
            covered = min(len(rows), len(targets))
            stats["hits"] += int((ids[:covered] == targets[:covered, None]).any(-1).sum())
            stats["positions"] += covered
            stats["missing"] += len(targets) - covered
            writer.add(split, sample_id, tokenized_hash(ex.input_ids), ids, log_probs, tail)
            if stats["positions"] >= CHECK_AFTER or n_lines == len(records):
                _check_hits(v1_file, cfg, stats)
    if n_lines != len(records):
        raise UserError(
            f"{v1_file}: {n_lines} lines for the {len(records)} records of {cfg.dataset.labeled_path}; "
            "a v1 logits file has one line per record, in the same order"
        )
    _check_hits(v1_file, cfg, stats)


def _check_hits(v1_file: Path, cfg, stats: dict) -> None:
    positions, hits = stats["positions"], stats["hits"]
    if positions and hits / positions < MIN_LABEL_HITS:
        raise UserError(
            f"{v1_file}: only {hits}/{positions} label tokens are among the ids of their rows; the file does not "
            f"describe the records of {cfg.dataset.labeled_path} as this config tokenises them"
        )
