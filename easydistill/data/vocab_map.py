"""The teacher -> student vocabulary map of cross-tokenizer distillation, built once from the two tokenizers.

Every vocabulary entry is read as the text it stands for, in bytes: byte-level BPE entries through the GPT-2
byte alphabet ("Ġhello" -> b" hello"), sentencepiece entries with the word marker as a space ("▁hello" ->
b" hello") and byte-fallback entries as their byte ("<0xE4>" -> b"\\xe4"); special tokens are matched by their
content among special tokens only, so a literal "<|im_end|>" typed in a text never meets the real one.

A teacher entry maps to
  - the student entry with exactly the same bytes (EXACT), else
  - the longest student entry whose bytes begin it (PREFIX): the teacher's "12345" goes to the student's "1"
    or "123". This is the student's first token of that text when the student tokenizes it greedily, so the
    teacher's probability of the whole entry becomes the student's probability of starting it;
  - nothing (unmapped): its mass goes to the residual bucket (see docs/losses.md, "Cross-tokenizer").
The overlap reported by `validate` is the share of the student's entries some teacher entry matches exactly.
Needs only a `tokenizers.Tokenizer` (a fast tokenizer's `backend_tokenizer`): no torch, no transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

Piece = bytes | str | None  # text bytes, a special token's content, or None for an id with no entry
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORD_MARK = "\u2581"  # sentencepiece's "▁"


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the others are moved
    to the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _types(node) -> set[str]:
    """Every component type named in a tokenizer.json subtree (decoders nest in Sequence)."""
    found = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _types(value)
    return found


def token_pieces(backend) -> list[Piece]:
    """Per token id, what it stands for: bytes of text, a special token's content (str), or None (no entry)."""
    spec = json.loads(backend.to_str())
    kinds = _types(spec.get("decoder")) | _types(spec.get("pre_tokenizer"))
    byte_level = "ByteLevel" in kinds
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback")) or "ByteFallback" in kinds
    marks = "Metaspace" in kinds or _WORD_MARK in json.dumps(spec.get("decoder"), ensure_ascii=False)
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces: list[Piece] = [None] * (max(vocab.values(), default=-1) + 1)
    alphabet = _byte_alphabet()
    for token, i in vocab.items():
        if i in added:
            pieces[i] = added[i].content if added[i].special else added[i].content.encode("utf-8")
        elif byte_fallback and (m := _BYTE_FALLBACK.match(token)):
            pieces[i] = bytes([int(m.group(1), 16)])
        elif byte_level and all(c in alphabet for c in token):
            pieces[i] = bytes(alphabet[c] for c in token)
        else:
            text = token.replace(_WORD_MARK, " ") if marks else token
            pieces[i] = text.encode("utf-8")
    return pieces


@dataclass(frozen=True)
class VocabMap:
    """teacher_to_student[i]: the student id teacher id i maps to, -1 when unmapped (see the module doc)."""

    teacher_to_student: tuple[int, ...]
    exact: int  # teacher entries mapped to the same bytes
    prefix: int  # teacher entries mapped to their longest student prefix
    unmapped: int  # teacher entries (including ids with no entry) whose mass goes to the residual bucket
    reachable: int  # student entries some teacher entry matches exactly
    student_entries: int  # student ids that stand for something

    @property
    def overlap(self) -> float:
        """Share of the student's vocabulary reachable from the teacher's by exact match."""
        return self.reachable / max(self.student_entries, 1)

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the map: stored with projected teacher rows and checked when they are used."""
        blob = ",".join(map(str, self.teacher_to_student)).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def summary(self) -> str:
        total = len(self.teacher_to_student)
        return (
            f"vocabulary overlap {self.overlap:.1%} ({self.reachable} of {self.student_entries} student entries "
            f"match a teacher entry exactly); teacher entries: {self.exact} exact, {self.prefix} by prefix, "
            f"{self.unmapped} unmapped of {total}"
        )


def student_index(student: list[Piece]) -> dict[Piece, int]:
    """What each student entry stands for -> its id (the lowest id when two stand for the same)."""
    index: dict[Piece, int] = {}
    for j, piece in enumerate(student):
        if piece is not None and piece != b"":
            index.setdefault(piece, j)
    return index


def longest_prefix(text: bytes, index: dict[Piece, int], longest: int) -> int:
    """The id of the longest student entry that begins `text` (itself included), -1 when none does."""
    for length in range(min(len(text), longest), 0, -1):
        target = index.get(text[:length], -1)
        if target >= 0:
            return target
    return -1


def build_vocab_map(
    teacher: list[Piece], student: list[Piece], special_pairs: dict[str, str] | None = None
) -> VocabMap:
    """The map from the two tokenizers' `token_pieces`. Ties go to the lowest student id.

    special_pairs: teacher special token content -> the student's special token that plays its part (e.g. the
    teacher's end of turn "</s>" -> the student's "<|im_end|>"); specials with equal content pair by default.
    """
    special_pairs = special_pairs or {}
    index = student_index(student)
    longest = max((len(p) for p in index if isinstance(p, bytes)), default=0)
    out, exact, prefix, hit = [], 0, 0, set()
    for piece in teacher:
        key = special_pairs.get(piece, piece) if isinstance(piece, str) else piece
        target = index.get(key, -1) if key is not None and key != b"" else -1
        if target >= 0:
            exact += 1
            hit.add(target)
        elif isinstance(piece, bytes):
            target = longest_prefix(piece[:-1], index, longest)
            prefix += target >= 0
        out.append(target)
    unmapped = len(out) - exact - prefix
    entries = sum(1 for p in student if p is not None and p != b"")
    return VocabMap(tuple(out), exact, prefix, unmapped, len(hit), entries)


def special_pairs(teacher, student) -> dict[str, str]:
    """Teacher special content -> student special content for the tokens that play one part: end of sequence,
    padding, beginning of sequence (HF tokenizers' eos/pad/bos attributes), when both sides have one."""
    pairs = {}
    for name in ("eos_token", "pad_token", "bos_token"):
        t, s = getattr(teacher, name, None), getattr(student, name, None)
        if isinstance(t, str) and isinstance(s, str) and t not in pairs:
            pairs[t] = s
    return pairs


def vocab_map_for(teacher, student) -> VocabMap:
    """The map between two fast (Hugging Face) tokenizers, specials paired by `special_pairs`."""
    return build_vocab_map(
        token_pieces(teacher.backend_tokenizer),
        token_pieces(student.backend_tokenizer),
        special_pairs(teacher, student),
    )


class Continuations:
    """Where the teacher's distribution goes once part of its next entry is already written (cross-tokenizer
    positions inside a teacher token): for consumed bytes c, the teacher entries that begin with c, and for each
    the student entry that begins the rest (longest prefix, as the map does); an entry equal to c maps to -1,
    the residual, since what follows it is the next teacher token's to say. Built lazily, cached per c."""

    MAX_CONSUMED = 32  # bytes; longer consumed prefixes (rare: a teacher entry that long) give no row

    def __init__(self, teacher: list[Piece], student: list[Piece]):
        self.teacher = teacher
        self.index = student_index(student)
        self.longest = max((len(p) for p in self.index if isinstance(p, bytes)), default=0)
        self._by_prefix: dict[bytes, list[int]] | None = None
        self._cache: dict[bytes, tuple[list[int], list[int]]] = {}

    def __call__(self, consumed: bytes) -> tuple[list[int], list[int]]:
        """(teacher ids that begin with `consumed`, their student targets or -1)."""
        if consumed in self._cache:
            return self._cache[consumed]
        if self._by_prefix is None:
            self._by_prefix = {}
            for i, piece in enumerate(self.teacher):
                if isinstance(piece, bytes):
                    for n in range(1, min(len(piece), self.MAX_CONSUMED) + 1):
                        self._by_prefix.setdefault(piece[:n], []).append(i)
        ids = self._by_prefix.get(consumed, []) if consumed else []
        targets = [longest_prefix(self.teacher[i][len(consumed) :], self.index, self.longest) for i in ids]
        self._cache[consumed] = (ids, targets)
        return ids, targets
