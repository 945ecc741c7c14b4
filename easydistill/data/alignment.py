"""Aligning two tokenizations of the same text through character offsets (cross-tokenizer distillation).

The student and a teacher with another tokenizer read the same response text. A character position is a
*boundary* of a tokenization when a token starts there and shares no character with an earlier token: the byte
pieces of an emoji or a CJK character share that character, so only the first can open a boundary.
Positions where both tokenizations open a boundary are *common boundaries*; between two consecutive common
boundaries both sides hold tokens covering exactly the same characters (an aligned span).

A student token that opens a common boundary is *aligned*: its prediction and the teacher's prediction of the
token that starts at the same character are made after the same text. How the teacher's probability of that
first teacher token reaches the student's token depends on the span (see docs/losses.md, "Cross-tokenizer"):

    EXACT     one token on each side, same characters
    CHAIN     one student token = r > 1 teacher tokens: the student token's probability is the product of the
              teacher's conditional probabilities of the r tokens (chain rule)
    PREFIX    the span holds more student tokens: the first is a prefix of the first teacher token (or equal to
              it, when both split one character into the same byte pieces), which it inherits whole
    CROSSING  both sides split the span differently (no teacher token starts or ends with the student's):
              only the vocabulary map carries the teacher's distribution

Every other student token is INTERIOR (it starts inside an aligned span, after text the teacher never
conditioned on): the caller may still condition the teacher's row on the bytes already written
(data/cross_view.py), else it gets no teacher row. Nothing is dropped silently: `AlignmentCounts` adds up to the tokens
and characters given. Pure Python; the tokenizers are the caller's.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field

EXACT, CHAIN, PREFIX, CROSSING, INTERIOR = "exact", "chain", "prefix", "crossing", "interior"
KINDS = (EXACT, CHAIN, PREFIX, CROSSING, INTERIOR)


@dataclass
class AlignmentCounts:
    """How the student tokens (and their characters) of one or more texts were aligned."""

    tokens: int = 0  # student tokens counted
    chars: int = 0  # characters those tokens cover
    aligned_chars: int = 0  # characters of the aligned student tokens
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    conditioned: int = 0  # interior tokens given the teacher's distribution conditioned on the written text

    @property
    def aligned(self) -> int:
        return self.tokens - self.by_kind[INTERIOR]

    def add(self, other: AlignmentCounts) -> AlignmentCounts:
        self.tokens += other.tokens
        self.chars += other.chars
        self.aligned_chars += other.aligned_chars
        self.conditioned += other.conditioned
        for k in KINDS:
            self.by_kind[k] += other.by_kind[k]
        return self

    def summary(self) -> str:
        share = self.aligned_chars / self.chars if self.chars else 0.0
        kinds = ", ".join(f"{self.by_kind[k]} {k}" for k in KINDS if self.by_kind[k])
        inside = f" ({self.conditioned} conditioned on the teacher's token)" if self.by_kind[INTERIOR] else ""
        return (
            f"{self.aligned}/{self.tokens} student tokens aligned ({kinds or 'none'}{inside}); "
            f"{share:.1%} of {self.chars} response characters in aligned tokens"
        )


@dataclass(frozen=True)
class Alignment:
    """Per student token: the teacher token starting on the same character (-1 when interior), and the kind.

    `chain[j]` is the number r of teacher tokens that make up student token j exactly (r >= 1 for EXACT and
    CHAIN, 0 otherwise); they are the teacher tokens teacher[j] .. teacher[j] + r - 1.
    """

    teacher: tuple[int, ...]
    kind: tuple[str, ...]
    chain: tuple[int, ...]
    student_spans: tuple[tuple[int, int], ...]

    def counts(self, selected: Sequence[bool] | None = None) -> AlignmentCounts:
        """Counts over the student tokens `selected` marks (all by default), e.g. the label tokens.

        A character belongs to the first token that covers it, so byte pieces of one character count it once
        and the characters of all tokens add up to the text's length.
        """
        out, reached = AlignmentCounts(), 0
        for j, ((start, end), kind) in enumerate(zip(self.student_spans, self.kind)):
            own = max(0, end - max(start, reached))
            reached = max(reached, end)
            if selected is not None and not selected[j]:
                continue
            out.tokens += 1
            out.chars += own
            out.by_kind[kind] += 1
            if kind != INTERIOR:
                out.aligned_chars += own
        return out


def openers(spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token opens a boundary: it covers characters and none of them is shared with an earlier
    token (byte pieces of one character overlap the piece before them; empty spans open nothing)."""
    out, reached = [], 0
    for start, end in spans:
        out.append(end > start and start >= reached)
        reached = max(reached, end)
    return out


def align(
    student: Sequence[tuple[int, int]],
    teacher: Sequence[tuple[int, int]],
    student_pieces: Sequence[bytes] | None = None,
    teacher_pieces: Sequence[bytes] | None = None,
) -> Alignment:
    """Align two tokenizations of one text, given as character spans [start, end) in text order.

    Both lists cover the same text (spans may share a start: byte pieces of one character). With the tokens'
    bytes given, CHAIN and PREFIX are also checked byte for byte (pieces of one character share a span, so
    characters alone cannot tell which piece holds which bytes); a span that fails is CROSSING.
    """
    s_open, t_open = openers(student), openers(teacher)
    teacher_at = {span[0]: i for i, (span, opens) in enumerate(zip(teacher, t_open)) if opens}
    common = {s for (s, _), o in zip(student, s_open) if o} & set(teacher_at)
    # next opening student token after j (index), and the teacher token that opens the next common boundary
    next_open = [len(student)] * len(student)
    for j in range(len(student) - 2, -1, -1):
        next_open[j] = j + 1 if s_open[j + 1] else next_open[j + 1]
    teacher_of, kinds, chains = [], [], []
    for j, ((start, end), opens) in enumerate(zip(student, s_open)):
        i = teacher_at.get(start, -1) if opens and start in common else -1
        kind, r = (INTERIOR, 0) if i < 0 else _span_kind(j, i, end, student, teacher, next_open, common)
        checked = student_pieces is not None and teacher_pieces is not None
        if checked and kind in (CHAIN, EXACT) and b"".join(teacher_pieces[i : i + r]) != student_pieces[j]:
            kind, r = CROSSING, 0
        if checked and kind == PREFIX and not teacher_pieces[i].startswith(student_pieces[j]):
            kind = CROSSING
        teacher_of.append(i)
        kinds.append(kind)
        chains.append(r)
    return Alignment(tuple(teacher_of), tuple(kinds), tuple(chains), tuple(map(tuple, student)))


def _span_kind(j, i, end, student, teacher, next_open, common) -> tuple[str, int]:
    """(kind, r) of aligned student token j whose span starts where teacher token i does."""
    following = next_open[j]
    alone = following == j + 1 and (following == len(student) or student[following][0] in common)
    if alone:
        # the span ends where the next student token starts (or at the text's end): count the teacher's
        stop = student[following][0] if following < len(student) else None
        r = 1
        while i + r < len(teacher) and (stop is None or teacher[i + r][0] < stop):
            r += 1
        return (EXACT if r == 1 else CHAIN), r
    if teacher[i][1] >= end:
        return PREFIX, 0
    return CROSSING, 0


# ---------------------------------------------------------------- spans from token bytes


def spans_from_pieces(pieces: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character span of each piece) for token byte strings concatenated in order.

    A piece that starts inside a multi-byte character gets that character's start (as fast tokenizers'
    offsets do) and reaches to the end of the last character it touches. Bytes that are not valid UTF-8
    decode to U+FFFD, as `bytes.decode(errors="replace")` does.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    chunks, spans, emitted = [], [], 0
    for piece in pieces:
        pending = decoder.getstate()[0]
        start = emitted
        if pending and piece and _breaks(pending, piece[:1]):
            start += 1  # the pending bytes become U+FFFD on their own; this piece starts the next character
        chunk = decoder.decode(piece)
        chunks.append(chunk)
        emitted += len(chunk)
        end = emitted + (1 if decoder.getstate()[0] else 0)
        spans.append((start, max(start, end)) if piece else (start, start))
    chunks.append(decoder.decode(b"", final=True))
    return "".join(chunks), spans


def _breaks(pending: bytes, first: bytes) -> bool:
    """Whether `first` cannot continue the incomplete UTF-8 sequence `pending`."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(pending + first).startswith("\ufffd")
