"""Tokenized examples in an Arrow file: written a batch at a time, read memory-mapped, one row on demand.

A data file's examples go into one Arrow IPC file (columns sample_id, input_ids, labels, prompt_len, messages); a split is
an array of row numbers into it. `ExampleTable` is a read-only sequence of TokenizedExample over such rows, so
that training touches only the rows it batches: the memory a run needs does not grow with the data file, and a
second run maps the file instead of tokenizing again. It pickles as (file, rows), for DataLoader workers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from easydistill.data.tokenize import TokenizedExample

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("messages", pa.string()),  # JSON of the record's messages (after the character cut), or null
    ]
)
BATCH = 1024  # rows per written record batch: bounds the writer's memory


class ExampleWriter:
    """Appends TokenizedExamples to an Arrow file (or an in-memory buffer when `path` is None)."""

    def __init__(self, path: Path | None):
        self.sink = pa.OSFile(str(path), "wb") if path is not None else pa.BufferOutputStream()
        self.writer = pa.ipc.new_file(self.sink, SCHEMA)
        self.pending: list[TokenizedExample] = []
        self.rows = 0

    def add(self, example: TokenizedExample) -> int:
        """Append one example; returns its row number."""
        self.pending.append(example)
        if len(self.pending) >= BATCH:
            self._flush()
        self.rows += 1
        return self.rows - 1

    def _flush(self) -> None:
        if self.pending:
            columns = {name: [getattr(e, name) for e in self.pending] for name in SCHEMA.names[:4]}
            columns["messages"] = [
                None if e.messages is None else json.dumps(e.messages) for e in self.pending
            ]
            self.writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))
            self.pending = []

    def close(self):
        """Finish the file; returns the buffer for an in-memory table, else None."""
        self._flush()
        self.writer.close()
        if isinstance(self.sink, pa.BufferOutputStream):
            return self.sink.getvalue()
        self.sink.close()
        return None


class ExampleTable(Sequence):
    """TokenizedExamples of one split: rows of an Arrow file (a path, memory-mapped, or a buffer).

    Item i is the example at rows[i], with sample_index = start + i (its position in the whole split, also
    for a slice such as `examples[:100]`) and `split` as given."""

    def __init__(self, source, rows, split: str, start: int = 0):
        self.source, self.split, self.start = source, split, start
        self.rows = np.asarray(rows, dtype=np.int64)
        self._table = None

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            if isinstance(self.source, pa.Buffer):
                reader = pa.ipc.open_file(pa.BufferReader(self.source))
            else:
                reader = pa.ipc.open_file(pa.memory_map(str(self.source)))
            self._table = reader.read_all()
        return self._table

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("ExampleTable slices take every row (step 1)")
            return ExampleTable(self.source, self.rows[start:stop], self.split, self.start + start)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = int(self.rows[i])
        table = self.table
        messages = table["messages"][row].as_py()
        return TokenizedExample(
            table["sample_id"][row].as_py(),
            table["input_ids"][row].as_py(),
            table["labels"][row].as_py(),
            table["prompt_len"][row].as_py(),
            sample_index=self.start + i,
            split=self.split,
            messages=None if messages is None else json.loads(messages),
        )

    def __add__(self, other) -> list:  # as lists concatenate: reads every row of both
        return [*self, *other]

    def __radd__(self, other) -> list:
        return [*other, *self]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __getstate__(self):
        return {"source": self.source, "rows": self.rows, "split": self.split, "start": self.start}

    def __setstate__(self, state):
        self.__init__(state["source"], state["rows"], state["split"], state["start"])

    def __repr__(self) -> str:
        where = self.source if isinstance(self.source, (str, Path)) else "memory"
        return f"ExampleTable({len(self)} {self.split} examples from {where})"
