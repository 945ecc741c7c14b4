"""easydistill.evaluation: teacher-forced figures against a float64 reference; exact match of greedy answers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from easydistill.data import IGNORE_INDEX, V1_TEMPLATE, load_records, render_and_tokenize
from easydistill.evaluation import exact_match
from easydistill.evaluation.exact_match import exact_match_rate
from easydistill.evaluation.metrics import make_batches, teacher_forced_metrics
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


def test_exact_match_compares_greedy_answers_with_outputs(student, tokenizer):
    records = synthetic.make_records("reverse", 6, seed=0)
    found, basis = exact_match.plan(records)
    assert found.references == [r["output"] for r in records] and "each eval record's output" in basis
    answers = exact_match.greedy_answers(student, tokenizer, found.chats, found.references, max_new_tokens=5)
    own = [{"instruction": r["instruction"], "output": a} for r, a in zip(records, answers)]
    # Its own answers are right by definition; the v1 template renders the same ChatML prompt.
    assert exact_match_rate(student, tokenizer, own, max_new_tokens=5) == 1.0
    assert exact_match_rate(student, tokenizer, own, V1_TEMPLATE, max_new_tokens=5) == 1.0
    half = [dict(r, output=r["output"] + "x") if i % 2 else r for i, r in enumerate(own)]
    assert exact_match_rate(student, tokenizer, half, max_new_tokens=5) == 0.5
    spaced = [dict(r, output=f"  {r['output']} \n") for r in own]  # whitespace is normalised
    assert exact_match_rate(student, tokenizer, spaced, max_new_tokens=5) == 1.0


def test_match_rate_normalises_whitespace_only():
    assert exact_match.match_rate([" 19\n", "a  b", "190", "A"], ["19", "a b", "19", "a"]) == 0.5
    assert exact_match.match_rate([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match.match_rate(["1"], [])


def test_a_plugged_in_reference_judges_noisy_labels():
    def chat(instruction, output):
        return {
            "id": instruction,
            "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}],
        }

    def reverse(record):
        text = exact_match.last_turn(record, "user")
        if not text.startswith("reverse: "):
            raise ValueError(text)
        return text.removeprefix("reverse: ")[::-1]

    checker = exact_match.Reference("the reverse task", reverse)
    noisy = [chat("reverse: abc", "xyz"), chat("reverse: ab", "ba")]
    found, basis = exact_match.plan(noisy, "auto", checker)
    assert found.references == ["cba", "ba"] and basis.endswith("reference: the reverse task")
    assert exact_match.plan(noisy, "always", checker)[0].references == ["xyz", "ba"]  # the records' outputs
    mixed = [*noisy, chat("Tell me a story", "Once")]  # the checker cannot judge every record
    assert exact_match.plan(mixed, "auto", checker)[0].references == ["xyz", "ba", "Once"]
    assert exact_match.plan(noisy, "never", checker)[0] is None
    prompt_only = [{"id": "1", "messages": [{"role": "user", "content": "hi"}]}]
    assert exact_match.plan(prompt_only)[0] is None
