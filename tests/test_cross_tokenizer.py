"""Cross-tokenizer pieces: character alignment, the vocabulary map, the teacher's view, the projection.

Property tests run on seeded adversarial text (digits, whitespace runs, emoji and ZWJ sequences, CJK, combining
marks, byte-fallback characters, literal special-token strings) through two unlike tokenizers: the byte-level
BPE of the tiny models and a sentencepiece-style BPE with byte fallback. A literal "▁" is left out: a
sentencepiece tokenizer reads it as its word marker, so that text does not round-trip there.
"""

from __future__ import annotations

import random

import pytest
import torch

from easydistill.data import render_and_tokenize, render_prompt
from easydistill.data.alignment import CHAIN, EXACT, INTERIOR, KINDS, PREFIX, align, spans_from_pieces
from easydistill.data.cross_view import student_to_teacher_specials, teacher_view
from easydistill.data.vocab_map import build_vocab_map, special_pairs, token_pieces, vocab_map_for
from easydistill.loss.projection import chain_log_fraction, map_digest, project_pairs, project_rows

ATOMS = [
    "0", "7", "12", "345", "2024", "3.14", "-8", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "a", "the",
    " reward", "drawer", "😀", "👩‍👩‍👧", "🇫🇷", "中文", "分布", "é", "e\u0301", "ß", "Ω", "\u200b", "¿",
    "<|im_end|>", "</s>", "<0x41>", "Ġ", "\ufffd", "ŉ", "\u00a0", ".", ",", "!?", "'s",
]  # fmt: skip


def adversarial_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers_pair():
    """(student: byte-level BPE with ChatML, teacher: sentencepiece-style BPE with another template)."""
    from examples import synthetic
    from examples.tiny_models import build_tokenizer
    from examples.tiny_tokenizers import build_sentencepiece_tokenizer

    return build_tokenizer(), build_sentencepiece_tokenizer(synthetic.corpus(), 400)


def pieces_of(tokenizer, ids):
    table = token_pieces(tokenizer.backend_tokenizer)
    return [p.encode() if isinstance(p, str) else p for p in (table[i] for i in ids)]


# ---------------------------------------------------------------- spans and alignment


def test_spans_from_pieces_follow_utf8_characters():
    text, spans = spans_from_pieces([b"12", b"3", b" \xf0\x9f", b"\x98\x80", b"ab", b"", b"\xe4"])
    assert text == "123 😀ab\ufffd"
    # the emoji's second piece shares its character with the piece before: it starts inside it
    assert spans == [(0, 2), (2, 3), (3, 5), (4, 5), (5, 7), (7, 7), (7, 8)]
    text, spans = spans_from_pieces([b"a\xe4", b"b"])  # a broken sequence, then a new character
    assert text == "a\ufffdb" and spans == [(0, 2), (2, 3)]


def test_alignment_kinds_on_hand_made_spans():
    digits = [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert align(digits, [(0, 4)]).kind == (PREFIX, INTERIOR, INTERIOR, INTERIOR)
    chain = align([(0, 4)], [(0, 2), (2, 4)])
    assert chain.kind == (CHAIN,) and chain.chain == (2,)
    assert align([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]).kind == ("crossing", INTERIOR)
    same = align(digits, digits)
    assert same.kind == (EXACT,) * 4 and same.teacher == (0, 1, 2, 3)


def groups(alignment):
    """(student token indices, teacher token indices) of every aligned span, in order."""
    starts = [j for j, k in enumerate(alignment.kind) if k != INTERIOR]
    out = []
    for a, b in zip(starts, starts[1:] + [None]):
        t_end = alignment.teacher[b] if b is not None else None
        out.append((slice(a, b), slice(alignment.teacher[a], t_end)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_aligned_spans_cover_identical_characters(tokenizers_pair, seed):
    student, teacher = tokenizers_pair
    for text in adversarial_texts(60, seed):
        s_ids = student.backend_tokenizer.encode(text, add_special_tokens=False).ids
        t_ids = teacher.backend_tokenizer.encode(text, add_special_tokens=False).ids
        s_pieces, t_pieces = pieces_of(student, s_ids), pieces_of(teacher, t_ids)
        s_text, s_spans = spans_from_pieces(s_pieces)
        t_text, t_spans = spans_from_pieces(t_pieces)
        assert s_text == t_text == text  # both tokenizations spell the text, byte for byte
        alignment = align(s_spans, t_spans, s_pieces, t_pieces)
        counts = alignment.counts()
        # nothing dropped: every token has one kind, every character one owner
        assert sum(counts.by_kind.values()) == counts.tokens == len(s_ids)
        assert counts.chars == len(text) and 0 <= counts.aligned_chars <= counts.chars
        assert set(alignment.kind) <= set(KINDS)
        if s_ids:
            assert alignment.kind[0] != INTERIOR  # both start at character 0
        for s_slice, t_slice in groups(alignment):
            assert b"".join(s_pieces[s_slice]) == b"".join(t_pieces[t_slice])
        for j, (kind, i, r) in enumerate(zip(alignment.kind, alignment.teacher, alignment.chain)):
            if kind in (EXACT, CHAIN):
                assert b"".join(t_pieces[i : i + r]) == s_pieces[j] and (r == 1) == (kind == EXACT)
            if kind == PREFIX:
                assert t_pieces[i].startswith(s_pieces[j])  # equal when both split a character alike


def test_same_tokenizer_aligns_every_token_exactly(tokenizers_pair):
    student, _ = tokenizers_pair
    for text in adversarial_texts(30, seed=5):
        ids = student.backend_tokenizer.encode(text, add_special_tokens=False).ids
        pieces = pieces_of(student, ids)
        _, spans = spans_from_pieces(pieces)
        alignment = align(spans, spans, pieces, pieces)
        # byte pieces of one character are interior on both sides; every other token is EXACT with itself
        for j, kind in enumerate(alignment.kind):
            assert kind in (EXACT, PREFIX, INTERIOR)
            assert kind == INTERIOR or alignment.teacher[j] == j


# ---------------------------------------------------------------- the vocabulary map


def test_vocab_map_reads_both_tokenizer_families(tokenizers_pair):
    student, teacher = tokenizers_pair
    s_pieces, t_pieces = token_pieces(student.backend_tokenizer), token_pieces(teacher.backend_tokenizer)
    assert s_pieces[student.convert_tokens_to_ids("Ġ")] == b" "  # byte-level alphabet
    assert t_pieces[teacher.convert_tokens_to_ids("\u2581")] == b" "  # sentencepiece word marker
    assert t_pieces[teacher.convert_tokens_to_ids("<0xE4>")] == b"\xe4"  # byte fallback
    assert s_pieces[student.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"  # specials stay apart
    vmap = vocab_map_for(teacher, student)
    index = {p: j for j, p in reversed(list(enumerate(s_pieces)))}
    counted = {"exact": 0, "prefix": 0, "unmapped": 0}
    for piece, j in zip(t_pieces, vmap.teacher_to_student):
        if j < 0:
            counted["unmapped"] += 1
            assert (
                piece is None
                or isinstance(piece, str)
                or not any(piece[:n] in index for n in range(1, len(piece)))
            )
        elif isinstance(piece, bytes) and s_pieces[j] == piece:
            counted["exact"] += 1
        elif isinstance(piece, bytes):
            counted["prefix"] += 1
            # the longest student entry that begins the teacher's
            assert piece.startswith(s_pieces[j]) and len(s_pieces[j]) < len(piece)
            assert not any(piece[:n] in index for n in range(len(s_pieces[j]) + 1, len(piece)))
        else:
            counted["exact"] += 1  # a special token, paired by its part
            assert s_pieces[j] == special_pairs(teacher, student).get(piece, piece)
    assert counted == {"exact": vmap.exact, "prefix": vmap.prefix, "unmapped": vmap.unmapped}
    assert vmap.teacher_to_student[teacher.eos_token_id] == student.eos_token_id
    assert 0.5 < vmap.overlap < 1.0


def test_same_tokenizer_map_is_the_identity(tokenizers_pair):
    student, _ = tokenizers_pair
    vmap = vocab_map_for(student, student)
    assert vmap.teacher_to_student == tuple(range(len(student)))
    assert vmap.overlap == 1.0 and vmap.prefix == vmap.unmapped == 0
    other = build_vocab_map(
        token_pieces(student.backend_tokenizer)[:-1], token_pieces(student.backend_tokenizer)
    )
    assert other.digest != vmap.digest


# ---------------------------------------------------------------- the teacher's view of a record


def record(prompt: str, answer: str) -> dict:
    return {
        "id": "0",
        "source": "t:1",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


@pytest.mark.parametrize("seed", range(2))
def test_teacher_view_reads_the_response_through_its_own_template(tokenizers_pair, seed):
    student, teacher = tokenizers_pair
    s_pieces, t_pieces = token_pieces(student.backend_tokenizer), token_pieces(teacher.backend_tokenizer)
    to_teacher = student_to_teacher_specials(s_pieces, t_pieces, special_pairs(teacher, student))
    for prompt, answer in zip(adversarial_texts(20, seed), adversarial_texts(20, seed + 100)):
        rec = record(prompt, answer)
        ex = render_and_tokenize(rec, student, max_length=256)
        labels = [t != -100 for t in ex.labels]
        prefix = render_prompt(rec, teacher)
        view = teacher_view(
            ex.input_ids,
            labels,
            student_pieces=s_pieces,
            teacher_backend=teacher.backend_tokenizer,
            teacher_pieces=t_pieces,
            teacher_prefix=prefix,
            to_teacher_special=to_teacher,
        )
        # the student's tokenizer reads a literal "<|im_end|>" as its special token: the teacher gets its own
        assert teacher.decode(view.teacher_ids) == prefix + answer.replace("<|im_end|>", "</s>") + "</s>\n"
        n = sum(labels)
        assert len(view.rows) == len(view.first) == len(view.gold) == len(view.chain_length) == n
        assert view.counts.tokens + view.outside == n
        assert view.counts.aligned + view.counts.conditioned == sum(r >= 0 for r in view.rows)
        assert view.gold == [t for t in ex.labels if t != -100]
        for row, first, start, length in zip(view.rows, view.first, view.chain_start, view.chain_length):
            if first >= 0:
                assert view.teacher_ids[row + 1] == first and start == row + 1
                routed = b"".join(
                    t_pieces[view.teacher_ids[k]]
                    if isinstance(t_pieces[view.teacher_ids[k]], bytes)
                    else t_pieces[view.teacher_ids[k]].encode()
                    for k in range(start, start + length)
                )
                assert routed  # the routed teacher tokens exist in the teacher's sequence
        # interior tokens conditioned on the teacher token they start inside: its bytes begin with what is
        # written, and the rest of the teacher token starts where the student token does
        assert view.counts.conditioned <= view.counts.by_kind[INTERIOR]
        assert view.counts.conditioned == sum(c is not None for c in view.consumed)
        for row, written in zip(view.rows, view.consumed):
            if written is not None:
                piece = t_pieces[view.teacher_ids[row + 1]]
                assert isinstance(piece, bytes) and piece.startswith(written) and len(piece) > len(written)
        # the end of turn reaches the teacher as its own end of turn, aligned one to one
        assert view.first[-2] == teacher.eos_token_id and view.gold[-2] == student.eos_token_id


# ---------------------------------------------------------------- the projection


def dense_reference(logits, vmap, width, first, gold, log_fraction):
    """float64 loops: q over width + 1 categories (last = residual)."""
    p = torch.softmax(logits[:, : len(vmap)].double(), -1)
    q = torch.zeros(logits.shape[0], width + 1, dtype=torch.float64)
    for row in range(logits.shape[0]):
        moved = 0.0
        if first[row] >= 0:
            moved = float(p[row, first[row]]) * float(torch.tensor(float(log_fraction[row])).exp())
        for u, v in enumerate(vmap.tolist()):
            mass = float(p[row, u]) - (moved if u == first[row] else 0.0)
            q[row, v if v >= 0 else width] += mass
        if first[row] >= 0:
            q[row, int(gold[row])] += moved
    return q


@pytest.mark.parametrize("top_k", [3, 12])
def test_projection_matches_a_float64_reference_and_keeps_all_mass(top_k):
    gen = torch.Generator().manual_seed(0)
    n, vt, width = 7, 20, 12
    logits = torch.randn(n, vt + 4, generator=gen) * 3  # 4 padding columns, left out
    vmap = torch.randint(-1, width, (vt,), generator=gen)
    first = torch.tensor([3, -1, 0, 19, 5, 5, -1])
    gold = torch.tensor([1, 0, 11, 2, 5, 0, 0])
    log_fraction = torch.tensor([0.0, 0.0, -0.5, -3.0, 0.0, -20.0, 0.0])
    out = project_rows(logits, vmap, width, top_k=top_k, first=first, gold=gold, log_fraction=log_fraction)
    ref = dense_reference(logits, vmap, width, first, gold, log_fraction)
    total = torch.logsumexp(torch.cat([out.log_probs, out.tail.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(total, torch.zeros(n), atol=1e-6, rtol=0)
    kept = out.ids >= 0
    got = ref[:, :width].gather(-1, out.ids.clamp(min=0)).masked_fill(~kept, 0.0)
    torch.testing.assert_close(out.log_probs.double()[kept], got[kept].log(), atol=1e-5, rtol=1e-5)
    assert torch.equal(got, ref[:, :width].topk(min(top_k, width - 1), -1).values)  # really the top k
    torch.testing.assert_close(out.mapped_mass.double(), ref[:, :width].sum(-1), atol=1e-6, rtol=0)


def test_identity_projection_is_the_teachers_own_distribution():
    logits = torch.randn(5, 16) * 4
    out = project_rows(
        logits,
        torch.arange(16),
        16,
        top_k=16,
        first=torch.arange(5),
        gold=torch.arange(5),
        log_fraction=torch.zeros(5),
    )
    assert out.ids.shape == (5, 15)  # one id stays in the tail, as the student's counterpart of the residual
    log_p = torch.log_softmax(logits, -1)
    dense = torch.full((5, 16), float("nan")).scatter(-1, out.ids, out.log_probs)
    left = dense.isnan()
    torch.testing.assert_close(dense[~left], log_p[~left], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.tail, log_p[left], atol=1e-5, rtol=1e-5)  # the one id left out
    torch.testing.assert_close(out.mapped_mass, torch.ones(5))


def test_ids_without_teacher_mass_are_left_to_the_tail():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = project_rows(logits, torch.tensor([0, -1, 0]), 4, top_k=3)  # one student id reached, one residual
    assert out.ids.tolist() == [[0, -1, -1]]
    torch.testing.assert_close(out.tail.exp(), torch.softmax(logits, -1)[:, 1])


def test_conditioned_rows_renormalise_the_listed_teacher_entries():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 10, generator=gen) * 2
    row_of = torch.tensor([0, 0, 0, 1, 1, 2])
    teacher_ids = torch.tensor([1, 4, 7, 2, 3, 5])
    targets = torch.tensor([0, 0, -1, 3, 2, 1])
    out = project_pairs(logits, row_of, teacher_ids, targets, 5, top_k=4, teacher_vocab=8)
    p = torch.softmax(logits[:, :8].double(), -1)
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for r, i, t in zip(row_of.tolist(), teacher_ids.tolist(), targets.tolist()):
        expected[r, t if t >= 0 else 5] += p[r, i]
    expected /= expected.sum(-1, keepdim=True)
    dense = torch.zeros(3, 5, dtype=torch.float64)
    kept = out.ids >= 0
    dense[kept.nonzero()[:, 0], out.ids[kept]] = out.log_probs[kept].double().exp()
    torch.testing.assert_close(dense, expected[:, :5], atol=1e-6, rtol=1e-5)
    total = torch.logsumexp(torch.cat([out.log_probs, out.tail.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(total, torch.zeros(3), atol=1e-6, rtol=0)
    empty = project_pairs(
        logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), 5, top_k=4, teacher_vocab=8
    )
    assert (empty.ids[1:] < 0).all() and torch.equal(
        empty.tail[1:], torch.zeros(2)
    )  # nothing listed: residual


def test_chain_log_fraction_sums_the_following_tokens():
    lp = torch.log(torch.tensor([0.5, 0.25, 0.1, 0.8, 1.0]))
    got = chain_log_fraction(lp, torch.tensor([0, 1, 3, 4]), torch.tensor([3, 1, 2, 1]))
    torch.testing.assert_close(got, torch.stack([lp[1] + lp[2], torch.tensor(0.0), lp[4], torch.tensor(0.0)]))


def test_map_digest_changes_with_the_map():
    a = map_digest(torch.tensor([0, 1, -1]), 4)
    assert a == map_digest(torch.tensor([0, 1, -1]), 4)
    assert a != map_digest(torch.tensor([0, 2, -1]), 4) and a != map_digest(torch.tensor([0, 1, -1]), 5)
