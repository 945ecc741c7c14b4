"""Data at scale: a record is cut by characters before tokenizing (same tokens kept), a data file is tokenized
once into an Arrow file and mapped by later runs, and a checked data file is not read again.

benchmarks/data_scale.py measures what this buys (time to the first step, peak memory).
"""

from __future__ import annotations

import json
import pickle

import pytest

from easydistill.data import build_dataset, load_records, validate_data_file
from easydistill.data.cache import cache_root
from easydistill.data.table import ExampleTable
from easydistill.data.tokenize import char_budget, tokenize_record
from easydistill.errors import UserError
from examples.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class CountingTokenizer:
    """Delegates to a real tokenizer and records the length of every text it tokenizes."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def long_records():
    words = "one two three 12+7=19 reverse: drawer reward "
    return [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Tell a story.", "output": words * 3000},  # ~140k characters of response
        {"instruction": words * 2000, "output": "done"},  # a long prompt: nothing of the response is left
    ]


@pytest.mark.parametrize("max_length", [8, 40, 200])
def test_cut_by_characters_keeps_the_same_tokens(tok, tmp_path, max_length):
    records = load_records(write_jsonl(tmp_path / "d.jsonl", long_records()))
    budget = char_budget(tok, max_length)
    assert budget < 80_000  # so the long contents are cut
    for record in records:
        cut = tokenize_record(record, tok, None, max_length, budget)
        whole = tokenize_record(record, tok, None, max_length, None)
        assert cut[3] == (max(len(m["content"]) for m in record["messages"]) > budget)
        if whole[0] is None:
            assert cut[0] is None
            continue
        assert (cut[0].input_ids, cut[0].labels, cut[0].prompt_len) == (
            whole[0].input_ids,
            whole[0].labels,
            whole[0].prompt_len,
        )
        assert cut[2] == whole[2]  # truncated either way


def test_a_huge_record_is_never_tokenized_whole(tok, tmp_path):
    huge = {"instruction": "Tell a long story.", "output": "the quick brown fox " * 1_000_000}  # 20 MB
    path = write_jsonl(tmp_path / "huge.jsonl", [huge, {"instruction": "a", "output": "b"}])
    counting = CountingTokenizer(tok)
    train, _, stats = build_dataset(path, counting, max_length=64)
    assert max(counting.lengths) < char_budget(tok, 64) + 200  # the budget plus the template's own text
    assert stats.n_clipped == 1 and stats.n_truncated == 1
    assert len(train) == 2 and len(train[0].input_ids) == 64


def test_second_build_maps_the_cached_file(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": f"{i}+1=", "output": str(i + 1)} for i in range(50)]
    )
    first = build_dataset(path, tok, max_length=32, eval_ratio=0.2, seed=3)
    counting = CountingTokenizer(tok)
    second = build_dataset(path, counting, max_length=32, eval_ratio=0.2, seed=3)
    assert counting.lengths == []  # nothing tokenized again
    assert list(second[0]) == list(first[0]) and list(second[1]) == list(first[1])
    assert second[2] == first[2]
    assert isinstance(second[0], ExampleTable) and len(second[1]) == 10
    assert [ex.sample_index for ex in second[1]] == list(range(10))
    assert {ex.split for ex in second[1]} == {"eval"}
    tokenized = cache_root() / "tokenized"
    assert not [p for p in tokenized.iterdir() if p.name.startswith(".")]  # written whole, then renamed

    other_length = build_dataset(path, counting, max_length=16, eval_ratio=0.2, seed=3)
    assert counting.lengths and max(len(ex.input_ids) for ex in other_length[0]) <= 16
    counting.lengths.clear()
    with path.open("a") as f:  # the file changed: tokenized again
        f.write(json.dumps({"instruction": "new", "output": "one"}) + "\n")
    changed = build_dataset(path, counting, max_length=32, eval_ratio=0.2, seed=3)
    assert counting.lengths and changed[2].n_records == 51


def test_an_incomplete_cache_folder_is_built_again(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"{i}?", "output": "yes"} for i in range(5)])
    build_dataset(path, tok, max_length=32)
    (folder,) = [
        p for p in (cache_root() / "tokenized").iterdir() if (p / "meta.json").is_file() and _has(p, 5)
    ]
    (folder / "meta.json").write_text("{not json")
    counting = CountingTokenizer(tok)
    train, _, _ = build_dataset(path, counting, max_length=32)
    assert counting.lengths and len(train) == 5


def _has(folder, n):
    try:
        return json.loads((folder / "meta.json").read_text())["stats"]["n_records"] == n
    except ValueError:
        return False


def test_tables_pickle_by_reference_and_slice_by_position(tok, tmp_path):
    records = [{"instruction": f"{i}", "output": "x " * 40} for i in range(200)]
    train, _, _ = build_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, max_length=128)
    blob = pickle.dumps(train)
    assert len(blob) < 4000  # the path and 200 row numbers, not the tokens
    again = pickle.loads(blob)
    assert again[150] == train[150]
    head = train[:10]
    assert len(head) == 10 and head[9] == train[9] and head[9].sample_index == 9
    tail = train[190:]
    assert tail[0].sample_index == 190


def test_a_checked_file_is_not_read_again(tmp_path, monkeypatch):
    from easydistill.data import records

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 1)
    assert validate_data_file(path) == 1

    def never(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(records, "iter_records", never)
    assert validate_data_file(path) == 1
    monkeypatch.undo()
    path.write_text('{"instruction": "a"}\n')  # edited: checked again, and now refused
    with pytest.raises(UserError, match="record has no 'output'"):
        validate_data_file(path)
