"""Exact match: the share of eval records whose greedy answer equals their reference answer.

    from easydistill.evaluation.exact_match import exact_match_rate
    exact_match_rate(model, tokenizer, records, template_path)   # records with outputs: v1 or chat shape

A record's prompt is everything before its last assistant turn, rendered as training renders it; its reference
is that last turn (v1's `output`). The model answers greedily through the one generation helper
(train/generation.py: batched, left-padded, KV cache, stops at the model's stop ids), up to
`max_new_tokens` (default: the longest reference + 2 tokens). Answer and reference are compared after
whitespace normalisation (`normalise`).

Where a record's label is not the right answer (noisy data), a caller that can compute the right answer plugs in
a `Reference`: the quickstart passes its synthetic tasks' checker (examples/quickstart.py). The library knows no
task of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFINITION = (
    "share of eval records whose greedy answer equals the reference answer after whitespace normalisation "
    "(ends stripped, inner runs of whitespace read as one space)"
)
MODES = ("auto", "always", "never")


def normalise(text: str) -> str:
    return " ".join(text.split())


def match_rate(answers: Sequence[str], references: Sequence[str]) -> float:
    """Share of pairs equal after `normalise` (0.0 for no pairs)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalise(a) == normalise(r) for a, r in zip(answers, references)) / len(references)


def as_chat(record: dict, index: int = 0) -> dict:
    """A v1 `{instruction, output}` record (or one already in chat form) in chat form."""
    if "messages" in record:
        return {"source": f"record {index}", **record}
    return {
        "id": str(record.get("id", index)),
        "source": f"record {index}",
        "messages": [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["output"]},
        ],
    }


def last_turn(record: dict, role: str) -> str | None:
    """The content of the record's last `role` turn (chat form), None when it has none."""
    turns = [m["content"] for m in record["messages"] if m["role"] == role]
    return turns[-1] if turns else None


@dataclass(frozen=True)
class Reference:
    """A plug-in that knows a record's right answer: `answer(chat record)` returns it, or raises ValueError
    for a record it cannot judge (then the records' own outputs are used)."""

    name: str
    answer: Callable[[dict], str]


@dataclass(frozen=True)
class ExactMatch:
    """What the eval records are answered and judged against; `basis` is reported next to the figure."""

    chats: list[dict]
    references: list[str]
    basis: str

    def rate(
        self, model, tokenizer, template_path=None, *, max_new_tokens=None, batch_size: int = 64
    ) -> float:
        answers = greedy_answers(
            model, tokenizer, self.chats, self.references, template_path, max_new_tokens, batch_size
        )
        return match_rate(answers, self.references)


def plan(records: Sequence[dict], mode: str = "auto", reference: Reference | None = None):
    """(ExactMatch, or None when it is off or a record has no output; the sentence reported with the figure).

    mode auto: the plugged-in reference when it judges every record, else each record's output; always: each
    record's output whatever is plugged in; never: off.
    """
    if mode == "never":
        return None, "off (evaluation.exact_match is never)"
    chats = [as_chat(r, i) for i, r in enumerate(records)]
    if not chats or any(c["messages"][-1]["role"] != "assistant" for c in chats):
        return None, "skipped: the eval records have no reference outputs"
    if reference is not None and mode == "auto":
        try:
            answers = [reference.answer(c) for c in chats]
        except (ValueError, KeyError):
            answers = None
        if answers is not None:
            found = ExactMatch(chats, answers, f"{DEFINITION}; reference: {reference.name}")
            return found, found.basis
    outputs = [c["messages"][-1]["content"] for c in chats]
    found = ExactMatch(chats, outputs, f"{DEFINITION}; reference: each eval record's output")
    return found, found.basis


def greedy_answers(
    model, tokenizer, chats, references, template_path=None, max_new_tokens=None, batch_size: int = 64
) -> list[str]:
    """The model's greedy answers to the chats' prompts (their last assistant turn left out)."""
    from easydistill.data import render_prompt
    from easydistill.train.generation import Sampling, generate_texts

    if max_new_tokens is None:  # room for the longest reference plus its stop token
        lengths = (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        max_new_tokens = max(lengths, default=0) + 2
    prompts = [render_prompt(c, tokenizer, template_path=template_path) for c in chats]
    return generate_texts(model, tokenizer, prompts, Sampling(max_new_tokens), batch_size=batch_size)


def exact_match_rate(
    model, tokenizer, records, template_path=None, *, reference: Reference | None = None, **options
) -> float:
    """Exact match of `model` on records with outputs (options: max_new_tokens, batch_size)."""
    found, why = plan(records, "auto", reference)
    if found is None:
        raise ValueError(why)
    return found.rate(model, tokenizer, template_path, **options)
