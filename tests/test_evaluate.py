"""easydistill.evaluation.metrics: teacher-forced figures against a float64 reference, greedy decoding against a no-cache loop."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from easydistill.data import IGNORE_INDEX, V1_TEMPLATE, load_records, render_and_tokenize
from easydistill.evaluation.metrics import (
    answers_and_references,
    exact_match_rate,
    greedy_generate,
    make_batches,
    teacher_forced_metrics,
)
from examples import synthetic


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: (B, T) inputs -> the stored (B, T, V) logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("stored", logits)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so the model has a device to be found on
        self.training_flags_seen = []

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == self.stored.shape[:2] == attention_mask.shape
        self.training_flags_seen.append(self.training)
        return SimpleNamespace(logits=self.stored.clone())


def reference(student_logits, teacher_logits, labels, vocab):
    """float64 CE, KL(teacher‖student) and agreement over shifted label positions, written out by hand."""
    mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][mask]
    s = student_logits[:, :-1][mask].double()
    t = teacher_logits[:, :-1][mask].double()[:, :vocab]
    log_s_full = s - s.logsumexp(-1, keepdim=True)
    ce = -log_s_full.gather(-1, targets[:, None]).mean()
    log_s = s[:, :vocab] - s[:, :vocab].logsumexp(-1, keepdim=True)
    log_t = t - t.logsumexp(-1, keepdim=True)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    agree = (s[:, :vocab].argmax(-1) == t.argmax(-1)).double().mean()
    return float(ce), float(kl), float(agree), int(mask.sum())


def test_constructed_pair_matches_the_float64_reference():
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 6, 7
    student_logits = torch.randn(batch, length, vocab, generator=gen) * 2
    teacher_logits = torch.randn(batch, length, vocab + 3, generator=gen) * 2
    teacher_logits[..., vocab:] = 50.0  # padded embedding rows: would swallow all mass if not cut away
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # a masked prompt
    labels[1, 4:] = IGNORE_INDEX  # and right padding
    inputs = {
        "input_ids": torch.zeros(batch, length, dtype=torch.long),
        "attention_mask": torch.ones(batch, length),
    }
    student, teacher = FixedLogits(student_logits), FixedLogits(teacher_logits)
    student.train()

    got = teacher_forced_metrics(student, teacher, [{**inputs, "labels": labels}])

    ce, kl, agree, n = reference(student_logits, teacher_logits, labels, vocab)
    assert got["n_tokens"] == n == 3 * 4 - 2
    assert got["ce"] == pytest.approx(ce, abs=1e-5)
    assert got["kl"] == pytest.approx(kl, abs=1e-5) and kl > 0.1
    assert got["top1_agreement"] == pytest.approx(agree)
    assert student.training_flags_seen == [False] and student.training  # measured in eval mode, mode restored


def test_one_teacher_row_with_known_kl():
    # Teacher puts 1/2, 1/4, 1/4 where the student is uniform over 3 tokens: KL = log 3 - 1.5 log 2.
    teacher = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(1, 2, 3).contiguous()
    student = torch.zeros(1, 2, 3)
    batch = {
        "input_ids": torch.zeros(1, 2, dtype=torch.long),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "labels": torch.tensor([[IGNORE_INDEX, 0]]),
    }
    got = teacher_forced_metrics(FixedLogits(student), FixedLogits(teacher), [batch])
    assert got["kl"] == pytest.approx(
        torch.log(torch.tensor(3.0)).item() - 1.5 * torch.log(torch.tensor(2.0)).item()
    )
    assert got["ce"] == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert got["top1_agreement"] == 1.0  # a uniform row's argmax is its first token, as is the teacher's


@pytest.fixture(scope="module")
def student(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="module")
def batches(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("evaluate") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic.make_records("sort", 10, seed=0)))
    examples = [render_and_tokenize(r, tokenizer, max_length=64) for r in load_records(path)]
    return make_batches(examples, tokenizer.pad_token_id, batch_size=4)


def test_identical_models_have_zero_kl_and_full_agreement(student, batches):
    got = teacher_forced_metrics(student, student, batches)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["top1_agreement"] == 1.0
    assert got["n_tokens"] == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    alone = teacher_forced_metrics(student, None, batches)
    assert alone["kl"] is None and alone["ce"] == pytest.approx(got["ce"])


def test_a_padded_teacher_is_compared_on_the_shared_vocabulary(tiny_pair, student, batches):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair[0])  # 320 embedding rows vs the student's 285
    got = teacher_forced_metrics(student, teacher, batches)
    assert 0.0 < got["kl"] < 10.0 and 0.0 <= got["top1_agreement"] <= 1.0


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop: set[int]) -> str:
    """One prompt, no padding, no cache: the whole sequence again at every step."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


PROMPTS = [
    "<|im_start|>user\nsort: 5183<|im_end|>\n<|im_start|>assistant\n",
    "12+7=",
    "reverse: abcdefgh abc",
    "a",
]


def test_greedy_generate_batched_equals_one_by_one_without_cache(student, tokenizer):
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    expected = [reference_greedy(student, tokenizer, p, 6, stop) for p in PROMPTS]
    assert greedy_generate(student, tokenizer, PROMPTS, 6) == expected  # one left-padded batch
    assert greedy_generate(student, tokenizer, PROMPTS, 6, batch_size=3) == expected  # a batch of 3, then 1


def test_greedy_generate_stops_at_eos(student, tokenizer):
    # A random model rarely says eos: make a token it does produce the stop token.
    free = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    continuations = []
    for ids in free:
        new = []
        with torch.no_grad():
            for _ in range(6):
                new.append(int(student(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        continuations.append(new)
    stop_token = next(row[k] for row in continuations for k in range(1, 6) if row[k] not in row[:k])
    saved = student.generation_config.eos_token_id
    student.generation_config.eos_token_id = [stop_token]
    try:
        stop = {tokenizer.eos_token_id, stop_token}
        expected = [reference_greedy(student, tokenizer, p, 6, stop) for p in PROMPTS]
        got = greedy_generate(student, tokenizer, PROMPTS, 6)
    finally:
        student.generation_config.eos_token_id = saved
    assert got == expected
    assert any(len(tokenizer(g, add_special_tokens=False)["input_ids"]) < 6 for g in got)  # some row stopped


def test_exact_match_rate_compares_greedy_answers_with_outputs(student, tokenizer):
    records = synthetic.make_records("reverse", 6, seed=0)
    answers, references = answers_and_references(student, tokenizer, records, max_new_tokens=5)
    assert references == [r["output"] for r in records]
    own = [{"instruction": r["instruction"], "output": a} for r, a in zip(records, answers)]
    # Its own answers are right by definition; the v1 template renders the same ChatML prompt.
    assert exact_match_rate(student, tokenizer, own, max_new_tokens=5) == 1.0
    assert exact_match_rate(student, tokenizer, own, V1_TEMPLATE, max_new_tokens=5) == 1.0
    half = [dict(r, output=r["output"] + "x") if i % 2 else r for i, r in enumerate(own)]
    assert exact_match_rate(student, tokenizer, half, max_new_tokens=5) == 0.5
