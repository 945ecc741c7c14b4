"""The on-disk store of precomputed teacher distributions (format described in docs/logits.md).

    python -m easydistill.kd.infer --config x.json     # writes <dataset.logits_path>/

Per label position: the teacher's top-k token ids, their log-probabilities (raw: log_softmax of the logits at
temperature 1, fp16) and the log of the mass left outside them (the tail). A store is a folder:

    index.json              format, k, id width, vocab width, shards, and per split the samples in dataset
                            order: id, shard, first row, row count, token-id hash, CRC-32 of the rows
    shard-00000.safetensors ids (P, K·id_bytes) uint8, log_probs (P, K) fp16, tail (P,) fp16

It is written into `<store>.partial/` and renamed into place only when complete, so a folder at the store's
path is always whole. Each shard is written (then its sidecar list of samples) atomically, so an interrupted
run resumes with the shards it finished. Readers memory-map shards and check sizes and CRCs as they read.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from easydistill.errors import UserError

FORMAT, VERSION = "easydistill-topk", 1
INDEX = "index.json"
META = "meta.json"  # in the partial folder: what the store is being computed for
DEFAULT_SHARD_BYTES = 256 << 20
# Ends every preflight problem about a store that kd.infer would compute (kd.infer itself ignores them).
COMPUTE_HINT = "compute them with python -m easydistill.kd.infer"
FILE_SUFFIXES = (".json", ".jsonl")  # a logits_path so named is a file (v1's), never the store folder itself


def id_bytes_for(vocab_width: int) -> int:
    """Bytes per stored token id: the smallest of 2, 3, 4 whose all-ones value (the empty slot) is unused."""
    return next(b for b in (2, 3, 4) if vocab_width < (1 << (8 * b)) - 1)


def bytes_per_position(top_k: int, vocab_width: int) -> int:
    return top_k * (id_bytes_for(vocab_width) + 2) + 2


def pack_ids(ids: np.ndarray, id_bytes: int) -> np.ndarray:
    """(n, K) int ids, -1 for an empty slot -> (n, K·id_bytes) uint8, little-endian, empty = all ones."""
    n, k = ids.shape
    wide = np.where(ids < 0, (1 << (8 * id_bytes)) - 1, ids).astype("<u4")
    return wide.view(np.uint8).reshape(n, k, 4)[:, :, :id_bytes].reshape(n, k * id_bytes)


def unpack_ids(packed: np.ndarray, id_bytes: int) -> np.ndarray:
    n = packed.shape[0]
    wide = np.zeros((n, packed.shape[1] // id_bytes, 4), dtype=np.uint8)
    wide[:, :, :id_bytes] = packed.reshape(n, -1, id_bytes)
    ids = wide.view("<u4")[:, :, 0].astype(np.int64)
    ids[ids == (1 << (8 * id_bytes)) - 1] = -1
    return ids


def _crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def partial_path(store: Path) -> Path:
    return store.with_name(store.name + ".partial")


def is_complete(store) -> bool:
    return (Path(store) / INDEX).is_file()


def store_location(cfg, spec) -> tuple[Path, Path | None]:
    """(store folder, EasyDistill v1 JSONL file to convert into it, or None) of a cached teacher.

    logits_format "auto": an existing file is a v1 JSONL, converted into `<file>.store/`; a path that names a
    file (v1's `logits.json`, `*.jsonl`) but does not exist yet gets its store at `<path>.store/` too, so that
    the name keeps meaning a file; anything else is a store folder. "easydistill_v1" always reads logits_path as
    a v1 file; "store" always as the store folder.
    """
    path = Path(spec.logits_path)
    fmt = cfg.dataset.logits_format or "auto"
    if fmt == "easydistill_v1" or (fmt == "auto" and path.is_file()):
        return path.with_name(path.name + ".store"), path
    if fmt == "auto" and not path.is_dir() and path.suffix.lower() in FILE_SUFFIXES:
        return path.with_name(path.name + ".store"), None
    return path, None


def sample_list(train, evaluation) -> dict[str, list[tuple[str, str]]]:
    """Per split, (sample id, token-id hash) in dataset order: what a store must cover (scored or imported)."""
    from easydistill.data import tokenized_hash

    return {
        split: [(ex.sample_id, tokenized_hash(ex.input_ids)) for ex in exs]
        for split, exs in (("train", train), ("eval", evaluation))
    }


def vocab_width(cfg, teacher_rows: int | None = None) -> int:
    """Columns a stored distribution covers: the shared width of teacher and student, as online KD cuts."""
    from easydistill.model_files import embedding_rows

    student_rows = embedding_rows(cfg.models.student)
    return min(student_rows, teacher_rows) if teacher_rows else student_rows


class StoreWriter:
    """Streams rows into shards; resumes a partial store computed for the same data and settings.

    `samples` maps each split to its (sample id, token-id hash) pairs in dataset order: the store must hold
    every one of them when `finish()` is called.
    """

    def __init__(
        self,
        store,
        *,
        top_k: int,
        vocab_width: int,
        samples: dict,
        source: str,
        shard_bytes=None,
        vocab_map=None,
    ):
        self.store, self.partial = Path(store), partial_path(Path(store))
        self.top_k, self.vocab_width, self.id_bytes = top_k, vocab_width, id_bytes_for(vocab_width)
        self.samples = {split: [list(p) for p in pairs] for split, pairs in samples.items()}
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "top_k": top_k,
            "id_bytes": self.id_bytes,
            "vocab_width": vocab_width,
            "source": source,
            "samples": self.samples,
        }
        if (
            vocab_map is not None
        ):  # rows projected from another tokenizer: the hash of the map they went through
            self.meta["vocab_map"] = vocab_map
        per_position = bytes_per_position(top_k, vocab_width)
        self.shard_positions = max(1, (shard_bytes or DEFAULT_SHARD_BYTES) // per_position)
        self.entries: dict[tuple[str, str], list] = {}  # (split, id) -> [shard, start, length, hash, crc]
        self.next_shard = 0
        self._buffer: list[tuple[str, str, str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._open()

    def _open(self) -> None:
        meta_file = self.partial / META
        for folder, ours in ((self.store, False), (self.partial, meta_file.is_file())):
            if folder.exists() and not ours and (not folder.is_dir() or any(folder.iterdir())):
                raise UserError(
                    f"{folder} exists and is not a teacher-logits store; move it away or change logits_path"
                )
        if meta_file.is_file():
            try:
                same = json.loads(meta_file.read_text()) == json.loads(json.dumps(self.meta))
            except json.JSONDecodeError:
                same = False
            if same:
                for sidecar in sorted(self.partial.glob("shard-*.json")):
                    shard = int(sidecar.stem.split("-")[1])
                    for split, sample_id, start, length, digest, crc in json.loads(sidecar.read_text()):
                        self.entries[(split, sample_id)] = [shard, start, length, digest, crc]
                    self.next_shard = max(self.next_shard, shard + 1)
                return
            print(
                f"note: {self.partial} was computed for other data or settings; starting it again", flush=True
            )
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        _write_json(meta_file, self.meta)

    def done(self, split: str, sample_id: str) -> bool:
        return (split, sample_id) in self.entries

    def add(self, split: str, sample_id: str, digest: str, ids, log_probs, tail) -> None:
        """One sample's rows: ids (n, K) int (-1 empty), log_probs (n, K), tail (n,), n = its label positions."""
        ids, log_probs, tail = np.asarray(ids), np.asarray(log_probs), np.asarray(tail)
        if ids.shape != (len(tail), self.top_k) or log_probs.shape != ids.shape:
            raise ValueError(
                f"rows of {sample_id!r}: ids {ids.shape}, log_probs {log_probs.shape}, tail {tail.shape}"
            )
        packed = pack_ids(ids, self.id_bytes)
        self._buffer.append(
            (split, sample_id, digest, packed, log_probs.astype(np.float16), tail.astype(np.float16))
        )
        self._buffered += len(tail)
        if self._buffered >= self.shard_positions:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.numpy import save_file

        shard, start, listed = self.next_shard, 0, []
        for split, sample_id, digest, packed, log_probs, tail in self._buffer:
            listed.append([split, sample_id, start, len(tail), digest, _crc(packed, log_probs, tail)])
            start += len(tail)
        arrays = {
            "ids": np.concatenate([b[3] for b in self._buffer]),
            "log_probs": np.concatenate([b[4] for b in self._buffer]),
            "tail": np.concatenate([b[5] for b in self._buffer]),
        }
        name = f"shard-{shard:05d}"
        tmp = self.partial / f"{name}.safetensors.tmp"
        save_file(arrays, str(tmp))
        os.replace(tmp, self.partial / f"{name}.safetensors")
        _write_json(self.partial / f"{name}.json", listed)  # last: a shard counts once its list exists
        for split, sample_id, first, length, digest, crc in listed:
            self.entries[(split, sample_id)] = [shard, first, length, digest, crc]
        self.next_shard, self._buffer, self._buffered = shard + 1, [], 0

    def abandon(self) -> None:
        """Remove the partial store (its input was refused; nothing should resume from it)."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self) -> Path:
        """Write the index and move the folder into place. Every listed sample must have its rows."""
        self._flush()
        splits = {}
        for split, pairs in self.samples.items():
            columns = {k: [] for k in ("ids", "shard", "start", "length", "hash", "crc")}
            for sample_id, digest in pairs:
                entry = self.entries.get((split, sample_id))
                if entry is None or entry[3] != digest:
                    raise RuntimeError(f"store {self.store}: no rows for {split} sample {sample_id!r}")
                columns["ids"].append(sample_id)
                for key, value in zip(("shard", "start", "length", "hash", "crc"), entry):
                    columns[key].append(value)
            splits[split] = columns
        files = [self.partial / f"shard-{i:05d}.safetensors" for i in range(self.next_shard)]
        shards = [{"file": f.name, "bytes": f.stat().st_size} for f in files]
        index = {k: v for k, v in self.meta.items() if k != "samples"}
        index.update(shards=shards, splits=splits, positions=sum(sum(c["length"]) for c in splits.values()))
        _write_json(self.partial / INDEX, index)
        for leftover in [*self.partial.glob("*.json"), *self.partial.glob("*.tmp")]:
            if leftover.name != INDEX:
                leftover.unlink()
        os.replace(self.partial, self.store)  # the store appears complete or not at all
        return self.store


@dataclass(frozen=True)
class Entry:
    split: str
    sample_id: str
    shard: int
    start: int
    length: int
    hash: str
    crc: int


class TopKLogitsStore:
    """Read-only view of a complete store; shards are memory-mapped on first use."""

    def __init__(self, path):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            hint = (
                " (an interrupted kd.infer left it; run it again to finish)"
                if partial_path(self.path).exists()
                else ""
            )
            raise UserError(f"{self.path}: not a complete teacher-logits store, no {INDEX}{hint}")
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise UserError(f"{index_file}: not an {FORMAT} v{VERSION} index")
            self.top_k, self.id_bytes = int(index["top_k"]), int(index["id_bytes"])
            self.vocab_width = int(index["vocab_width"])
            self.source = index.get("source", "")
            self.vocab_map = index.get("vocab_map")  # None: the teacher shares the student's tokenizer
            self.splits = index["splits"]
            self._lookup = {s: {sid: i for i, sid in enumerate(c["ids"])} for s, c in self.splits.items()}
            shards = index["shards"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{index_file}: unreadable store index ({exc}); delete the store and run kd.infer"
            ) from None
        self._files: list[Path] = []
        for shard in shards:
            file = self.path / shard["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != shard["bytes"]:
                state = "is missing" if size < 0 else f"has {size} bytes, the index says {shard['bytes']}"
                raise UserError(
                    f"{file}: shard {state} (truncated or replaced); delete the store and run kd.infer"
                )
            self._files.append(file)
        self._handles: dict[int, object] = {}

    @property
    def bytes_per_position(self) -> int:
        return self.top_k * (self.id_bytes + 2) + 2

    def count(self, split: str) -> int:
        return len(self.splits.get(split, {}).get("ids", ()))

    def entry(self, split: str, index: int) -> Entry:
        """The rows of the `index`-th sample of `split`, in the dataset order the store was computed on."""
        columns = self.splits.get(split)
        if columns is None or not 0 <= index < len(columns["ids"]):
            n = 0 if columns is None else len(columns["ids"])
            raise UserError(
                f"{self.path}: no teacher rows for {split} example #{index} (the store holds {n} {split} examples); "
                "it was computed for other data: delete it and run kd.infer again"
            )
        return Entry(split, *(columns[k][index] for k in ("ids", "shard", "start", "length", "hash", "crc")))

    def find(self, split: str, sample_id: str) -> Entry | None:
        i = self._lookup.get(split, {}).get(sample_id)
        return None if i is None else self.entry(split, i)

    def _shard(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            file = self._files[shard]
            try:
                self._handles[shard] = safe_open(str(file), framework="np")
            except Exception as exc:  # safetensors reports a bad header with its own error type
                raise UserError(
                    f"{file}: corrupted shard ({exc}); delete the store and run kd.infer"
                ) from None
        return self._handles[shard]

    def read(self, entry: Entry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (n, K) int64 with -1 for empty slots, log_probs (n, K) fp16, tail (n,) fp16), CRC-checked."""
        handle = self._shard(entry.shard)
        stop = entry.start + entry.length
        try:
            packed = handle.get_slice("ids")[entry.start : stop]
            log_probs = handle.get_slice("log_probs")[entry.start : stop]
            tail = handle.get_slice("tail")[entry.start : stop]
        except Exception as exc:
            raise UserError(f"{self._files[entry.shard]}: cannot read {entry.sample_id!r} ({exc})") from None
        if len(tail) != entry.length or _crc(packed, log_probs, tail) != entry.crc:
            raise UserError(
                f"{self._files[entry.shard]}: the rows of {entry.split} sample {entry.sample_id!r} fail their "
                "checksum (corrupted shard); delete the store and run kd.infer again"
            )
        return unpack_ids(packed, self.id_bytes), log_probs, tail
