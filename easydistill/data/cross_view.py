"""The teacher's view of a student sequence when the two tokenizers differ (cross-tokenizer distillation).

The teacher reads the conversation through its own template up to the first response (`teacher_prefix`),
then the student's text from its first label token on (the *region*), with the student's special tokens
replaced by the teacher's that play the same part (end of turn -> end of turn); a student special with no
counterpart ends the region. The region's characters are the same on both sides, so `alignment.align` pairs
the tokens. Later turns of a multi-turn record reach the teacher in the student's template (documented in
docs/losses.md). Pure Python over a `tokenizers.Tokenizer`; works for on-policy samples too (any ids).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from easydistill.data.alignment import (
    CHAIN,
    EXACT,
    INTERIOR,
    PREFIX,
    AlignmentCounts,
    align,
    openers,
    spans_from_pieces,
)
from easydistill.data.vocab_map import Piece

OUTSIDE = "outside"  # label tokens after a student special token the teacher has no counterpart for


@dataclass
class TeacherView:
    """One sample as the teacher reads it, and per student label token (in order) where its teacher row is."""

    teacher_ids: list[int]
    rows: list[int] = field(
        default_factory=list
    )  # teacher position whose logits predict the aligned token, -1
    first: list[int] = field(default_factory=list)  # teacher id routed to the gold student token, -1 for none
    gold: list[int] = field(default_factory=list)  # the student's label token
    chain_start: list[int] = field(default_factory=list)  # teacher position of the first routed token
    chain_length: list[int] = field(default_factory=list)  # teacher tokens the gold token is made of (1: all)
    # bytes of the teacher's token already written before an interior student token (its row is then the
    # teacher's distribution conditioned on them), None for aligned rows and rows without a teacher row
    consumed: list[bytes | None] = field(default_factory=list)
    counts: AlignmentCounts = field(default_factory=AlignmentCounts)
    outside: int = 0


SPECIAL_MARK = b"\xff\xfe"  # never in UTF-8 text: a special token's bytes for matching never equal any text's


def _matchable(piece: Piece) -> bytes:
    """What a piece is compared by: its bytes, or (special tokens) a marked form that only another special
    token of the same content equals."""
    return SPECIAL_MARK + piece.encode("utf-8") if isinstance(piece, str) else (piece or b"")


def _teacher_spans(text: str, ids: list[int], offsets, pieces: list[Piece]) -> tuple[list, list[bytes]]:
    """(character spans of the teacher's tokens, their matchable bytes). Spans come from the tokens' bytes when
    those spell the text exactly (so byte pieces of one character are told apart), else from the offsets."""
    spelled = [p.encode("utf-8") if isinstance(p, str) else (p or b"") for p in (pieces[i] for i in ids)]
    matched = [_matchable(pieces[i]) for i in ids]
    if b"".join(spelled) == text.encode("utf-8"):
        return spans_from_pieces(spelled)[1], matched
    return [tuple(o) for o in offsets], matched


def teacher_view(
    student_ids: list[int],
    labels: list[bool],
    *,
    student_pieces: list[Piece],
    teacher_backend,
    teacher_pieces: list[Piece],
    teacher_prefix: str,
    to_teacher_special: dict[str, str],
) -> TeacherView:
    """Build the teacher's sequence for one student sequence and align them.

    student_ids the student's tokens (prompt + response, no padding); labels[t] whether token t is a label;
    to_teacher_special student special content -> teacher special content.
    """
    first_label = next((t for t, is_label in enumerate(labels) if is_label), None)
    if first_label is None:
        return TeacherView(teacher_backend.encode(teacher_prefix, add_special_tokens=False).ids)
    region: list[
        bytes
    ] = []  # the student's pieces as the teacher reads them: its specials in their text form
    matched: list[bytes] = []  # the same, specials marked (see _matchable)
    for token in student_ids[first_label:]:
        piece = student_pieces[token] if token < len(student_pieces) else None
        if isinstance(piece, str):
            piece = to_teacher_special.get(piece)
            if piece is None:
                break
            region.append(piece.encode("utf-8"))
            matched.append(_matchable(piece))
            continue
        region.append(piece or b"")
        matched.append(piece or b"")
    region_text, student_spans = spans_from_pieces(region)
    text = teacher_prefix + region_text
    encoding = teacher_backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    spans, t_bytes = _teacher_spans(text, ids, encoding.offsets, teacher_pieces)
    cut = len(teacher_prefix)
    inside = [k for k, (start, _) in enumerate(spans) if start >= cut]
    first_inside = inside[0] if inside else len(ids)
    teacher_spans = [(s - cut, e - cut) for s, e in spans[first_inside:]]
    alignment = align(student_spans, teacher_spans, matched, t_bytes[first_inside:])
    view = TeacherView(ids)
    label_flags = labels[first_label : first_label + len(region)]
    view.counts = alignment.counts(label_flags)
    shifted = [(a + cut, b + cut) for a, b in student_spans]  # the teacher's text holds its prefix first
    inside = _inside_teacher_tokens(text, shifted, spans, t_bytes, matched)
    for j, is_label in enumerate(label_flags):
        if not is_label:
            continue
        i, kind = alignment.teacher[j], alignment.kind[j]
        consumed = None
        position = first_inside + i
        if kind == INTERIOR and j in inside:  # a row of the teacher token it starts inside
            position, consumed, routed = inside[j]
            view.counts.conditioned += 1
        else:
            routed = kind in (EXACT, CHAIN, PREFIX)
        view.rows.append(position - 1 if (kind != INTERIOR or consumed) and position >= 1 else -1)
        view.first.append(ids[position] if routed else -1)
        view.gold.append(student_ids[first_label + j])
        view.chain_start.append(position if routed else 0)
        view.chain_length.append(max(alignment.chain[j], 1) if routed and not consumed else 1)
        view.consumed.append(consumed)
    # labels after the region (a special token without a counterpart, then what follows): no teacher row
    view.outside = sum(labels[first_label + len(region) :])
    for t in range(first_label + len(region), len(labels)):
        if labels[t]:
            for values, fill in (
                (view.rows, -1),
                (view.first, -1),
                (view.gold, student_ids[t]),
                (view.chain_start, 0),
                (view.chain_length, 1),
                (view.consumed, None),
            ):
                values.append(fill)
    return view


def _inside_teacher_tokens(text, student_spans, teacher_spans, teacher_bytes, student_bytes) -> dict:
    """Student token j -> (teacher token k it starts inside, bytes of k written before it, whether k's rest
    begins with the student token) for student tokens that start a character strictly inside a teacher token
    whose bytes begin with the text before them (not for byte pieces inside one character). Spans are in the
    teacher's text (its prefix first), so a teacher token reaching over the prefix's end counts too."""
    t_open = openers(teacher_spans)
    starts = [s for (s, _), o in zip(teacher_spans, t_open) if o]
    index = [k for k, o in enumerate(t_open) if o]
    out = {}
    for j, ((x, _), opens) in enumerate(zip(student_spans, openers(student_spans))):
        at = bisect.bisect_left(starts, x) - 1  # the last teacher opener before x
        if not opens or at < 0 or starts[at] == x:
            continue
        k = index[at]
        if teacher_spans[k][1] <= x:
            continue
        consumed = text[starts[at] : x].encode("utf-8")
        piece = teacher_bytes[k]
        if consumed and len(consumed) < len(piece) and piece.startswith(consumed):
            out[j] = (k, consumed, piece[len(consumed) :].startswith(student_bytes[j]))
    return out


def student_to_teacher_specials(
    student_pieces: list[Piece], teacher_pieces: list[Piece], pairs: dict[str, str]
):
    """Student special content -> teacher special content: the inverse of `vocab_map.special_pairs`, plus the
    specials both sides have under one name."""
    teacher_specials = {p for p in teacher_pieces if isinstance(p, str)}
    out = {p: p for p in student_pieces if isinstance(p, str) and p in teacher_specials}
    out.update({s: t for t, s in pairs.items()})
    return out
