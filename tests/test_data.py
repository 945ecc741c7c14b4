"""easydistill.data: formats, label masking, truncation, ids, split, collation.

The tokenizer is a byte-level BPE trained here on a few sentences, with a ChatML chat template,
so these tests need no other easydistill module and no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from easydistill.data import (
    IGNORE_INDEX,
    V1_TEMPLATE,
    KDCollator,
    TokenizedDataset,
    TokenizedExample,
    build_dataset,
    load_prompts,
    load_records,
    render_and_tokenize,
    render_prompt,
    tokenized_hash,
    validate_data_file,
)
from easydistill.errors import UserError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END = "<|im_end|>\n"
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "What is two plus two? It is four. Answer: hello world",
    "Reverse the word: drawer -> reward. Say hi. Sure thing!",
]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


def write(tmp_path: Path, name: str, records) -> Path:
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        p.write_text(json.dumps(records, indent=2))
    return p


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def label_runs(example: TokenizedExample) -> list[list[int]]:
    """Contiguous runs of label tokens."""
    runs, current = [], []
    for t in example.labels:
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------- shapes and labels


@pytest.mark.parametrize("template", [None, V1_TEMPLATE], ids=["chat_template", "v1_template"])
@pytest.mark.parametrize(
    ("record", "user", "output"),
    [
        ({"instruction": "Say hi.", "output": "hello world"}, "Say hi.", "hello world"),
        ({"instruction": "Reverse:", "input": "drawer", "output": "reward"}, "Reverse:\ndrawer", "reward"),
        (
            {"prompt": "What is two plus two?", "completion": "It is four."},
            "What is two plus two?",
            "It is four.",
        ),
        (
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
            "Say hi.",
            "hi",
        ),
    ],
    ids=["instruction", "alpaca_input", "prompt_completion", "chat"],
)
def test_shapes_tokenize_with_response_labels(tmp_path, tok, template, record, user, output):
    (rec,) = load_records(write(tmp_path, "d.jsonl", [record]))
    assert rec["id"] == "0" and rec["source"].endswith("d.jsonl:1")
    assert rec["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    ex = render_and_tokenize(rec, tok, template_path=template, max_length=256)
    prompt = f"<|im_start|>user\n{user}{END}<|im_start|>assistant\n"
    assert decode(tok, ex.input_ids) == prompt + output + END
    assert all(t == IGNORE_INDEX for t in ex.labels[: ex.prompt_len])
    assert decode(tok, ex.input_ids[: ex.prompt_len]) == prompt
    assert decode(tok, [t for t in ex.labels if t != IGNORE_INDEX]) == output + END
    assert ex.input_ids == tok(prompt + output + END, add_special_tokens=False)["input_ids"]


def test_multi_turn_chat_labels_every_assistant_turn_only(tmp_path, tok):
    turns = [
        ("system", "Be brief."),
        ("user", "Say hi."),
        ("assistant", "hi"),
        ("user", "What is two plus two?"),
        ("assistant", "It is four."),
    ]
    record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    (rec,) = load_records(write(tmp_path, "chat.json", [record]))
    ex = render_and_tokenize(rec, tok, max_length=256)
    assert [decode(tok, run) for run in label_runs(ex)] == ["hi" + END, "It is four." + END]
    masked = decode(tok, [i for i, t in zip(ex.input_ids, ex.labels) if t == IGNORE_INDEX])
    assert "Say hi." in masked and "two plus two" in masked and "Be brief." in masked


def test_v1_template_renders_expected_text(tmp_path, tok):
    record = {"instruction": "Say hi.", "output": "hello", "system": "Be brief."}
    (rec,) = load_records(write(tmp_path, "d.json", [record]))
    expected_prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(rec, template_path=V1_TEMPLATE) == expected_prompt
    ex = render_and_tokenize(rec, tok, template_path=V1_TEMPLATE, max_length=256)
    assert decode(tok, ex.input_ids) == expected_prompt + "hello<|im_end|>\n"


def test_v1_template_rejects_multi_turn_and_unused_system(tmp_path, tok):
    chat = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    (rec,) = load_records(write(tmp_path, "d.jsonl", [chat]))
    with pytest.raises(UserError, match="single-turn"):
        render_and_tokenize(rec, tok, template_path=V1_TEMPLATE, max_length=64)
    bare = tmp_path / "bare.jinja"
    bare.write_text("{{ message['content'] }}{% if add_output %}{{ message['output'] }}{% endif %}")
    (rec,) = load_records(write(tmp_path, "s.jsonl", [{"instruction": "a", "output": "b", "system": "x"}]))
    with pytest.raises(UserError, match="system prompt"):
        render_and_tokenize(rec, tok, template_path=bare, max_length=64)


def test_template_that_never_renders_the_output_is_an_error(tmp_path, tok):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if add_generation_prompt %}Q: {% endif %}{{ message['content'] }}")
    (rec,) = load_records(write(tmp_path, "d.jsonl", [{"instruction": "a", "output": "b"}]))
    with pytest.raises(UserError, match="never renders message\\['output'\\]"):
        render_and_tokenize(rec, tok, template_path=bad, max_length=64)


def test_bpe_merge_across_boundary_uses_joint_tokenisation(tmp_path, tok):
    # The prompt ends with a space that BPE merges into the first response word (" hello").
    template = tmp_path / "qa.jinja"
    template.write_text(
        "{{ 'Q: ' + message['content'] + '\\nA:' }}{% if add_generation_prompt %} {% endif %}"
        "{% if add_output %} {{ message['output'] }}{% endif %}"
    )
    (rec,) = load_records(write(tmp_path, "d.jsonl", [{"instruction": "Say hi.", "output": "hello world"}]))
    ex = render_and_tokenize(rec, tok, template_path=template, max_length=64)
    full = "Q: Say hi.\nA: hello world"
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    separate = tok("Q: Say hi.\nA: ", add_special_tokens=False)["input_ids"] + tok("hello world")["input_ids"]
    assert separate != ex.input_ids  # the merge really happens
    merged = tok.convert_ids_to_tokens(ex.input_ids[ex.prompt_len - 1])
    assert merged == "Ġhello"  # starts in the prompt → stays masked
    assert decode(tok, [t for t in ex.labels if t != IGNORE_INDEX]) == " world"


def test_slow_tokenizer_fallback_matches_when_no_merge(tmp_path, tok):
    class NoOffsets:  # a tokenizer without offset mappings, like a slow (Python) tokenizer
        is_fast = False
        chat_template = tok.chat_template

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

        def apply_chat_template(self, *args, **kwargs):
            return tok.apply_chat_template(*args, **kwargs)

    (rec,) = load_records(write(tmp_path, "d.jsonl", [{"instruction": "Say hi.", "output": "hello"}]))
    fast = render_and_tokenize(rec, tok, max_length=64)
    slow = render_and_tokenize(rec, NoOffsets(), max_length=64)
    assert (slow.input_ids, slow.labels, slow.prompt_len) == (fast.input_ids, fast.labels, fast.prompt_len)


def test_tokenizer_without_chat_template_needs_a_template(tmp_path, tok):
    (rec,) = load_records(write(tmp_path, "d.jsonl", [{"instruction": "a", "output": "b"}]))
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_and_tokenize(rec, bare, max_length=64)


# ---------------------------------------------------------------- truncation


def test_truncation_counts_and_drops(tmp_path, tok):
    records = [
        {"instruction": "Say hi.", "output": "hello"},
        {"instruction": "Say hi.", "output": "hello world " * 20},
        {"instruction": "the quick brown fox jumps over the lazy dog " * 10, "output": "hi"},
    ]
    path = write(tmp_path, "d.jsonl", records)
    short = render_and_tokenize(load_records(path)[0], tok, max_length=10_000)
    max_length = len(short.input_ids) + 3
    train, evaluation, stats = build_dataset(path, tok, max_length=max_length)
    assert evaluation == []
    assert [ex.sample_id for ex in train] == ["0", "1"]
    assert [ex.sample_index for ex in train] == [0, 1]
    assert (stats.n_records, stats.n_truncated, stats.n_dropped) == (3, 2, 1)
    assert all(len(ex.input_ids) <= max_length for ex in train)
    assert stats.max_len_seen > max_length
    assert stats.n_response_tokens == sum(sum(t != IGNORE_INDEX for t in ex.labels) for ex in train)
    assert "1 dropped" in stats.summary()
    with pytest.raises(UserError, match="no training example left"):
        build_dataset(write(tmp_path, "long.jsonl", records[2:]), tok, max_length=max_length)


# ---------------------------------------------------------------- user errors


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(UserError, match=r"file\.jsonl:3:"):
        load_records(p)
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(UserError, match=r"file\.jsonl:3: field 'output' must be a string"):
        validate_data_file(p)


def test_malformed_json_file_names_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:3:\d+: invalid JSON"):
        load_records(p)
    p.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(UserError, match="JSON list"):
        load_records(p)


def test_json_list_items_know_their_line(tmp_path):
    p = write(tmp_path, "d.json", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(UserError, match=r"d\.json:6 \(item 1\): record has no 'output'"):
        load_records(p)


def test_mixed_shapes_is_an_error(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"prompt": "a", "completion": "b"}]
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: record shape 'prompt' differs .*mixed\.jsonl:1"):
        load_records(write(tmp_path, "mixed.jsonl", records))


def test_duplicate_ids_name_both_places(tmp_path):
    records = [{"id": "x", "instruction": "a", "output": "b"}, {"id": "y", "instruction": "a", "output": "b"}]
    records.append({"id": "x", "instruction": "c", "output": "d"})
    with pytest.raises(UserError, match=r"duplicate sample id 'x' at .*d\.jsonl:1 and .*d\.jsonl:3"):
        load_records(write(tmp_path, "d.jsonl", records))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("instruction,output\n")
    with pytest.raises(UserError, match="unknown data file extension '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        load_records(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- prompts, parquet, ids


def test_load_prompts_accepts_strings_and_unlabeled_records(tmp_path):
    assert load_prompts(write(tmp_path, "p.json", ["Say hi.", "Reverse: drawer"]))[1] == {
        "id": "1",
        "messages": [{"role": "user", "content": "Reverse: drawer"}],
        "source": f"{tmp_path / 'p.json'}:3 (item 1)",
        "content_hash": load_prompts(write(tmp_path, "q.json", ["Reverse: drawer"]))[0]["content_hash"],
    }
    labeled = load_prompts(write(tmp_path, "l.jsonl", [{"instruction": "a", "output": "b"}]))
    assert labeled[0]["messages"] == [{"role": "user", "content": "a"}]
    assert validate_data_file(write(tmp_path, "i.jsonl", [{"prompt": "a"}] * 3), prompts=True) == 3
    with pytest.raises(UserError, match="bare string is a prompt"):
        load_records(tmp_path / "p.json")


def test_parquet_round_trip(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"id": "a", "instruction": "Say hi.", "input": None, "output": "hello"},
        {"id": "b", "instruction": "Reverse:", "input": "drawer", "output": "reward"},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    from_parquet = load_records(tmp_path / "d.parquet")
    from_jsonl = load_records(write(tmp_path, "d.jsonl", records))
    assert [r["messages"] for r in from_parquet] == [r["messages"] for r in from_jsonl]
    assert [r["id"] for r in from_parquet] == ["a", "b"]
    assert from_parquet[1]["source"].endswith("d.parquet row 1")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="cannot read parquet"):
        load_records(tmp_path / "junk.parquet")


def test_split_is_deterministic_disjoint_and_order_independent(tmp_path, tok):
    records = [{"id": f"s{i}", "instruction": f"Say hi {i}.", "output": "hello"} for i in range(20)]
    path = write(tmp_path, "d.jsonl", records)
    train, evaluation, stats = build_dataset(path, tok, max_length=64, eval_ratio=0.25, seed=7)
    train_ids, eval_ids = {ex.sample_id for ex in train}, {ex.sample_id for ex in evaluation}
    assert len(eval_ids) == 5 and not train_ids & eval_ids and len(train_ids | eval_ids) == 20
    assert stats.n_records == 20
    again = build_dataset(path, tok, max_length=64, eval_ratio=0.25, seed=7)[1]
    shuffled = write(tmp_path, "shuffled.jsonl", records[::-1])
    reordered = build_dataset(shuffled, tok, max_length=64, eval_ratio=0.25, seed=7)[1]
    assert {ex.sample_id for ex in again} == eval_ids == {ex.sample_id for ex in reordered}
    other_seed = build_dataset(path, tok, max_length=64, eval_ratio=0.25, seed=8)[1]
    assert {ex.sample_id for ex in other_seed} != eval_ids
    eval_file = write(tmp_path, "eval.jsonl", records[:3])
    train, evaluation, _ = build_dataset(path, tok, max_length=64, eval_path=eval_file)
    assert len(train) == 20 and [ex.sample_index for ex in evaluation] == [0, 1, 2]


# ---------------------------------------------------------------- collation and hashes


def test_collator_pads_and_carries_sample_index():
    examples = [
        TokenizedExample("a", [5, 6, 7], [-100, 6, 7], 1, sample_index=0),
        TokenizedExample("b", [8, 9], [-100, 9], 1, sample_index=1),
    ]
    dataset = TokenizedDataset(examples)
    batch = KDCollator(pad_token_id=0, pad_to_multiple_of=4)([dataset[1], dataset[0]])
    assert batch["input_ids"].tolist() == [[8, 9, 0, 0], [5, 6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 9, -100, -100], [-100, 6, 7, -100]]
    assert batch["sample_index"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())
    assert KDCollator(pad_token_id=0)(examples)["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        KDCollator(pad_token_id=0)([{"input_ids": [1], "labels": [1]}])


def test_tokenized_hash_is_stable_and_sensitive():
    h = tokenized_hash([1, 2, 3])
    assert h == tokenized_hash([1, 2, 3]) == tokenized_hash(torch.tensor([1, 2, 3]))
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == "e2353910701f1c2a"  # pinned: cached teacher rows must keep matching across versions
    assert len({h, tokenized_hash([1, 2, 4]), tokenized_hash([1, 23]), tokenized_hash([12, 3])}) == 4
