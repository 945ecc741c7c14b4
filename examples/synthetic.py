"""Synthetic tasks with exactly checkable answers, small enough for a tiny transformer to learn on CPU.

    add       "12+7="          -> "19"       operands 0..99
    reverse   "reverse: bdca"  -> "acdb"     3..6 letters from LETTERS
    sort      "sort: 5183"     -> "1358"     3..6 digits
    copy      "copy: bdca"     -> "bdca"     3..6 letters from LETTERS (the easiest: a sanity check)

Records use the EasyDistill v1 labeled shape `{"instruction", "output"}`. Everything is a pure function
of (task, n, seed), so a teacher trained on one split and a student distilled on another are reproducible.
"""

from __future__ import annotations

import random

TASKS = ("add", "reverse", "sort", "copy")
# Task letters are chosen so that no two of them sit next to each other in any fixed word of the
# prompts (roles, task names): the tokenizer then learns no merge inside a payload (see `corpus`).
LETTERS = "abcdefgh"
DIGITS = "0123456789"
PREFIXES = {"reverse": "reverse: ", "sort": "sort: ", "copy": "copy: "}
ROLES = ("system", "user", "assistant")
MIN_LEN, MAX_LEN = 3, 6  # payload length for reverse, sort and copy
MAX_OPERAND = 99


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _space_size(task: str) -> int:
    """How many distinct instructions a task has."""
    if task == "add":
        return (MAX_OPERAND + 1) ** 2
    alphabet = DIGITS if task == "sort" else LETTERS
    return sum(len(alphabet) ** k for k in range(MIN_LEN, MAX_LEN + 1))


def _instruction(task: str, rng: random.Random) -> str:
    if task == "add":
        return f"{rng.randint(0, MAX_OPERAND)}+{rng.randint(0, MAX_OPERAND)}="
    alphabet = DIGITS if task == "sort" else LETTERS
    payload = "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
    return PREFIXES[task] + payload


def infer_task(instruction: str) -> str:
    """The task an instruction belongs to."""
    for task, prefix in PREFIXES.items():
        if instruction.startswith(prefix):
            return task
    if instruction.endswith("=") and "+" in instruction:
        return "add"
    raise ValueError(f"not an instruction of any synthetic task: {instruction!r}")


def answer(task: str | None, instruction: str) -> str:
    """The one right output for `instruction` (task inferred when None)."""
    task = task or infer_task(instruction)
    _check_task(task)
    if task == "add":
        left, right = instruction.removesuffix("=").split("+")
        return str(int(left) + int(right))
    prefix = PREFIXES[task]
    if not instruction.startswith(prefix):
        raise ValueError(f"{task} instruction must start with {prefix!r}: {instruction!r}")
    payload = instruction[len(prefix) :]
    if task == "reverse":
        return payload[::-1]
    if task == "sort":
        return "".join(sorted(payload))
    return payload


def make_records(task: str, n: int, seed: int = 0, exclude=()) -> list[dict]:
    """`n` distinct records `{"instruction", "output"}` for `task`, a pure function of (task, n, seed).

    The first k records do not depend on n (a larger n extends a smaller one). `exclude` is a collection
    of instructions to leave out, e.g. a training set's, to draw a disjoint held-out set.
    """
    _check_task(task)
    excluded = {r["instruction"] if isinstance(r, dict) else r for r in exclude}
    available = _space_size(task) - len(excluded)
    if n > available:
        raise ValueError(f"task {task!r} has only {available} distinct instructions left; asked for {n}")
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and platforms.
    rng = random.Random(f"examples.synthetic:{task}:{seed}")
    seen: set[str] = set(excluded)
    records = []
    while len(records) < n:
        instruction = _instruction(task, rng)
        if instruction in seen:
            continue
        seen.add(instruction)
        records.append({"instruction": instruction, "output": answer(task, instruction)})
    return records


def right_answer(record: dict) -> str:
    """The right answer to a chat record's last user turn; ValueError when it is no task's instruction."""
    from easydistill.evaluation.exact_match import last_turn

    return answer(None, last_turn(record, "user") or "")


def reference():
    """The exact-match plug-in the quickstart passes to the library: held-out answers are judged against the
    task's right answer, not the record's label (the quickstart's training labels are noisy)."""
    from easydistill.evaluation.exact_match import Reference

    return Reference("the synthetic task's right answer (examples/synthetic.py)", right_answer)


def corpus(seed: int = 0) -> list[str]:
    """Texts to train the tokenizer on: the tasks' fixed words and their whole alphabet.

    Digits are split one by one by the tokenizer's pre-tokenizer, so whole add and sort records are
    included. Task letters appear only one at a time: BPE then never merges two of them, so every
    letter of a reverse or copy payload stays one token — which is what lets a tiny model learn
    reversal. The fixed words (roles, task names) are repeated so that they get merges of their own.
    """
    texts = []
    for _ in range(20):
        texts += [f"{role}\n" for role in ROLES]
        texts += list(PREFIXES.values())
    texts += list(LETTERS) + list(DIGITS)
    for task in ("add", "sort"):
        for record in make_records(task, 50, seed=seed):
            texts += [record["instruction"], record["output"]]
    return texts
