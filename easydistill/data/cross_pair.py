"""A student tokenizer and a teacher tokenizer that differ, paired once: the vocabulary map, the special tokens
that play one part on both sides, the teacher's rendering of a prompt, and the teacher's view of any student
sequence (easydistill/data/cross_view.py). No torch: `validate` uses it to report the pair, the cross-tokenizer
teacher to read batches.
"""

from __future__ import annotations

from easydistill.data.alignment import AlignmentCounts
from easydistill.data.cross_view import TeacherView, student_to_teacher_specials, teacher_view
from easydistill.data.render import render_prompt
from easydistill.data.vocab_map import build_vocab_map, special_pairs, token_pieces


def same_vocabulary(a, b) -> bool:
    """Whether two Hugging Face tokenizers give every text the same ids (same entries, same ids)."""
    return a.get_vocab() == b.get_vocab()


class CrossPair:
    """student and teacher: fast Hugging Face tokenizers; template_path: the run's Jinja template, if any (both
    sides then render with it; otherwise each side uses its own chat template)."""

    def __init__(self, student, teacher, template_path=None):
        for side, tok in (("student", student), ("teacher", teacher)):
            if getattr(tok, "backend_tokenizer", None) is None:
                raise ValueError(
                    f"cross-tokenizer distillation needs a fast tokenizer; the {side}'s is not one"
                )
        self.student, self.teacher, self.template_path = student, teacher, template_path
        self.student_pieces = token_pieces(student.backend_tokenizer)
        self.teacher_pieces = token_pieces(teacher.backend_tokenizer)
        pairs = special_pairs(teacher, student)
        self.vocab_map = build_vocab_map(self.teacher_pieces, self.student_pieces, pairs)
        self.to_teacher = student_to_teacher_specials(self.student_pieces, self.teacher_pieces, pairs)

    def prefix(self, record: dict) -> str:
        """The teacher's rendering of the record up to its first response (generation prompt on)."""
        messages = record["messages"]
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        prompt = {**record, "messages": messages[:first]}
        return render_prompt(prompt, self.teacher, template_path=self.template_path)

    def view(self, student_ids: list[int], labels: list[bool], prefix: str) -> TeacherView:
        return teacher_view(
            student_ids,
            labels,
            student_pieces=self.student_pieces,
            teacher_backend=self.teacher.backend_tokenizer,
            teacher_pieces=self.teacher_pieces,
            teacher_prefix=prefix,
            to_teacher_special=self.to_teacher,
        )

    def record_counts(self, records: list[dict], max_length: int) -> tuple[AlignmentCounts, int]:
        """(alignment counts over the records' label tokens, label tokens past the region) for `validate`."""
        from easydistill.data.tokenize import IGNORE_INDEX, render_and_tokenize

        total, outside = AlignmentCounts(), 0
        for record in records:
            example = render_and_tokenize(
                record, self.student, template_path=self.template_path, max_length=max_length
            )
            if example is None:
                continue
            view = self.view(
                example.input_ids, [t != IGNORE_INDEX for t in example.labels], self.prefix(record)
            )
            total.add(view.counts)
            outside += view.outside
        return total, outside
