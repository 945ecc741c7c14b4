"""examples.synthetic and examples.tiny_models: exact tasks, deterministic offline checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import synthetic, tiny_models
from examples.tiny_models import build_model, build_tokenizer

MESSAGES = [{"role": "user", "content": "12+7="}, {"role": "assistant", "content": "19"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_records_are_deterministic_distinct_and_seeded(task):
    records = synthetic.make_records(task, 200, seed=0)
    assert records == synthetic.make_records(task, 200, seed=0)
    assert records[:50] == synthetic.make_records(task, 50, seed=0)  # a larger n extends a smaller one
    assert records != synthetic.make_records(task, 200, seed=1)
    assert len({r["instruction"] for r in records}) == 200
    assert all(set(r) == {"instruction", "output"} for r in records)
    assert max(len(r["instruction"]) for r in records) <= 20
    assert max(len(r["output"]) for r in records) <= 8


def test_answers_are_right():
    for r in synthetic.make_records("add", 300, seed=3):
        left, right = r["instruction"].removesuffix("=").split("+")
        assert int(left) + int(right) == int(r["output"])
    for r in synthetic.make_records("reverse", 300, seed=3):
        payload = r["instruction"].removeprefix("reverse: ")
        assert r["output"][::-1] == payload and set(payload) <= set(synthetic.LETTERS)
    for r in synthetic.make_records("sort", 300, seed=3):
        payload = r["instruction"].removeprefix("sort: ")
        assert list(r["output"]) == sorted(payload) and payload.isdigit()
    for r in synthetic.make_records("copy", 300, seed=3):
        assert r["output"] == r["instruction"].removeprefix("copy: ")
    assert synthetic.answer("add", "12+7=") == "19"
    assert synthetic.answer(None, "reverse: abcd") == "dcba"
    assert synthetic.answer(None, "sort: 5183") == "1358"
    assert synthetic.infer_task("99+0=") == "add"


def test_exclude_gives_a_disjoint_held_out_set():
    train = synthetic.make_records("add", 500, seed=0)
    held_out = synthetic.make_records("add", 500, seed=1, exclude=train)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.make_records("multiply", 3)
    with pytest.raises(ValueError, match="distinct instructions"):
        synthetic.make_records("add", 10_001)
    with pytest.raises(ValueError, match="not an instruction"):
        synthetic.answer(None, "hello")


def test_the_exact_match_plug_in_judges_by_the_task():
    chat = {
        "messages": [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "zzz"}]
    }
    plug_in = synthetic.reference()
    assert plug_in.answer(chat) == "cba"  # the task's right answer, not the record's label
    with pytest.raises(ValueError):
        plug_in.answer({"messages": [{"role": "user", "content": "Tell me a story"}]})


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_tokenizer_round_trips_every_task(tok, task):
    for r in synthetic.make_records(task, 100, seed=5):
        messages = [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        text = tok.apply_chat_template(messages, tokenize=False)
        for s in (text, r["instruction"], r["output"]):
            ids = tok(s, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == s
        # One token per payload character: what lets a tiny model learn to reverse, sort and add.
        output_tokens = tok.convert_ids_to_tokens(tok(r["output"], add_special_tokens=False)["input_ids"])
        assert output_tokens == list(r["output"])


def test_tokenizer_round_trips_arbitrary_text(tok):
    text = "Grüße, 世界! \t tabs\n\nnew lines <|im_end|> and emoji 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_tokenizer_special_tokens_and_template(tok):
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids(list(tiny_models.SPECIAL_TOKENS)) == [0, 1, 2]
    assert len(tok) <= 320
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n"
    )
    assert tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tokenizer_is_deterministic_across_processes(tok):
    # Rust hash maps are seeded per process, so only another process shows an order-dependent vocabulary.
    code = "from examples.tiny_models import build_tokenizer; print(build_tokenizer().backend_tokenizer.to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == tok.backend_tokenizer.to_str()
    assert build_tokenizer().get_vocab() == tok.get_vocab()


# ---------------------------------------------------------------- models


def test_build_is_bitwise_deterministic(tmp_path, tok):
    a = build_model(tmp_path / "a", tokenizer=tok, seed=3)
    b = build_model(tmp_path / "b", tokenizer=build_tokenizer(), seed=3)
    c = build_model(tmp_path / "c", tokenizer=tok, seed=4)
    assert file_bytes(a) == file_bytes(b)
    assert file_bytes(a)["model.safetensors"] != file_bytes(c)["model.safetensors"]


def test_build_leaves_the_global_rng_alone(tmp_path, tok):
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_model(tmp_path / "m", tokenizer=tok)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "pair_fixture, cls", [("tiny_pair", "Qwen2ForCausalLM"), ("tiny_llama_pair", "LlamaForCausalLM")]
)
def test_pair_loads_offline_and_runs(request, pair_fixture, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = request.getfixturevalue(pair_fixture)
    tokenizers = [AutoTokenizer.from_pretrained(d) for d in (teacher_dir, student_dir)]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    tok = tokenizers[1]
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[0], skip_special_tokens=False) == text

    rows = {}
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert type(model).__name__ == cls
        rows[name] = model.get_input_embeddings().weight.shape[0]
        assert model.config.vocab_size == rows[name]
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], rows[name])
        assert torch.isfinite(logits).all()
        assert model.generation_config.pad_token_id == tok.pad_token_id
        assert tok.eos_token_id in model.generation_config.eos_token_id
    assert rows["student"] == len(tok)
    assert rows["teacher"] % 64 == 0 and rows["teacher"] > rows["student"]


def test_teacher_is_larger_than_student(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    sizes = [(d / "model.safetensors").stat().st_size for d in (teacher_dir, student_dir)]
    assert sizes[0] > sizes[1]


def test_mismatched_tokenizer_differs(tiny_pair, mismatched_tokenizer_model):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tiny_pair[1])
    theirs = AutoTokenizer.from_pretrained(mismatched_tokenizer_model)
    assert ours.get_vocab() != theirs.get_vocab()
    assert len(ours) != len(theirs)


def test_options_tied_bf16_and_padding(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    folder = build_model(
        tmp_path / "m",
        arch="llama",
        tokenizer=tok,
        tie_word_embeddings=True,
        padded_vocab=384,
        dtype="bfloat16",
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.get_input_embeddings().weight.shape[0] == 384
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model(tmp_path / "n", tokenizer=tok, padded_vocab=len(tok) - 1)
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(tmp_path / "o", tokenizer=tok, arch="gpt2")
    with pytest.raises(ValueError, match="unknown dtype"):
        build_model(tmp_path / "p", tokenizer=tok, dtype="int8")


# ---------------------------------------------------------------- CLI


def test_cli_builds_a_pair(tmp_path, capsys):
    tiny_models.main(["--out", str(tmp_path), "--arch", "llama"])
    out = capsys.readouterr().out
    assert str(tmp_path / "teacher") in out and str(tmp_path / "student") in out
    assert (tmp_path / "student" / "model.safetensors").is_file()
