"""A model teacher with another tokenizer than the student's, behind the same `rows(batch, mask)` as the others.

For each sample of a student batch (training data or on-policy samples alike) the teacher reads the same
conversation through its own template and tokenizer (data/cross_pair.py), runs once, and at every student
label position that opens a common character boundary gives its next-token distribution carried onto the
student's vocabulary (loss/projection.py); a position inside one of its tokens gets that token's row
conditioned on the bytes already written. Rows come back as `SparseRows` over the student's ids: the top
`top_k` plus a tail (residual: what maps to no student id, and the ids past the k). Label positions without a
teacher row (byte pieces inside one character) get an all-tail row, whose divergence is exactly 0: they learn
from cross-entropy only. Both are counted (`take_counts`).
"""

from __future__ import annotations

import dataclasses

import torch

from easydistill.data.cross_pair import CrossPair, same_vocabulary
from easydistill.data.tokenize import IGNORE_INDEX, SPLITS
from easydistill.data.vocab_map import Continuations
from easydistill.loss.projection import chain_log_fraction, map_digest, project_pairs, project_rows
from easydistill.loss.rows import SparseRows
from easydistill.models import final_hidden_states

ROW_CHUNK = 256  # teacher positions projected at a time: bounds the (n, V_t) and (n, V_s) fp32 buffers
COUNTS = ("label_positions", "aligned_positions", "mapped_mass")


class CrossTokenizerTeacher:
    """The Teacher interface (teachers/__init__.py) for a model teacher of another tokenizer: `rows` returns
    SparseRows on the student's vocabulary; its logits are not the student's, so it does not project.

    inner: the model teacher (an OnlineTeacher) whose tokenizer is pair.teacher; examples: split -> the run's
    TokenizedExamples (their records render the teacher's prompts); student_width: the student's vocabulary
    columns the rows cover."""

    projects = False
    head = None

    def __init__(self, inner, pair: CrossPair, examples: dict, *, student_width: int, top_k: int):
        self.spec = dataclasses.replace(inner.spec, kind="cross_tokenizer")
        self.inner, self.pair = inner, pair
        self.examples, self.top_k, self.width = examples, top_k, student_width
        self.map = torch.tensor(pair.vocab_map.teacher_to_student, dtype=torch.long)
        self.map_hash = map_digest(self.map, student_width)
        self.continuations = Continuations(pair.teacher_pieces, pair.student_pieces)
        teacher = pair.teacher
        self.pad_id = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id or 0
        self._prefixes: dict[tuple[int, int], str] = {}
        self.counts = torch.zeros(len(COUNTS), dtype=torch.float64)

    def take_counts(self) -> dict[str, float]:
        """Counts since the last call (label positions, aligned positions, mapped mass summed over them)."""
        out = dict(zip(COUNTS, self.counts.tolist()))
        self.counts.zero_()
        return out

    def _prefix(self, split: int, index: int) -> str:
        key = (split, index)
        if key not in self._prefixes:
            example = self.examples[SPLITS[split]][index]
            record = {"messages": example.messages, "source": f"sample {example.sample_id!r}"}
            self._prefixes[key] = self.pair.prefix(record)
        return self._prefixes[key]

    def views(self, batch: dict[str, torch.Tensor]) -> list:
        index = batch["sample_index"].tolist()
        split = batch["sample_split"].tolist() if "sample_split" in batch else [0] * len(index)
        views = []
        for b, (i, s) in enumerate(zip(index, split)):
            keep = batch["attention_mask"][b].bool()
            ids = batch["input_ids"][b][keep].tolist()
            labels = (batch["labels"][b][keep] != IGNORE_INDEX).tolist()
            labels[0] = False  # the first token is never predicted (the student's mask starts at t = 1)
            views.append(self.pair.view(ids, labels, self._prefix(s, i)))
        return views

    @torch.no_grad()
    def rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> SparseRows:
        """SparseRows (N, top_k) over the student's ids, row i for the student's i-th label position."""
        views = self.views(batch)
        counts = mask.sum(1).tolist()
        for b, (view, n) in enumerate(zip(views, counts)):
            if len(view.rows) != n:
                raise RuntimeError(
                    f"batch row {b}: {len(view.rows)} label tokens in the view for {n} positions"
                )
        device = mask.device
        hidden = self._hidden(views, device)  # (B, L_t, H_t)
        n_total = sum(counts)
        k = max(1, min(self.top_k, self.width - 1))  # as project_rows keeps
        out = SparseRows(
            torch.full((n_total, k), -1, dtype=torch.long, device=device),
            torch.full((n_total, k), -torch.inf, device=device),
            torch.zeros(n_total, device=device),
            self.width,
        )
        # (student row, batch row, teacher position, first, gold, chain start, chain length), and the consumed
        # bytes of conditioned rows
        picks, conditioned, consumed, at = [], [], [], 0
        for b, v in enumerate(views):
            for j, row in enumerate(v.rows):
                if row < 0:
                    continue
                pick = (at + j, b, row, v.first[j], v.gold[j], v.chain_start[j], v.chain_length[j])
                (picks if v.consumed[j] is None else conditioned).append(pick)
                if v.consumed[j] is not None:
                    consumed.append(v.consumed[j])
            at += len(v.rows)
        mapped = self._project(picks, hidden, views, out, k) + self._condition(
            conditioned, consumed, hidden, out, k
        )
        self.counts += torch.tensor([n_total, len(picks) + len(conditioned), mapped], dtype=torch.float64)
        return out

    def _project(self, picks, hidden, views, out: SparseRows, k: int) -> float:
        """Aligned rows through the vocabulary map, written into `out`; returns their mapped mass."""
        mapped, device = 0.0, hidden.device
        for start in range(0, len(picks), ROW_CHUNK):
            chunk = torch.tensor(picks[start : start + ROW_CHUNK], dtype=torch.long, device=device)
            logits = self.inner.head_logits(hidden[chunk[:, 1], chunk[:, 2]]).float()  # (n, V_t)
            fraction = self._chain_fractions(hidden, views, chunk)
            got = project_rows(
                logits,
                self.map.to(device),
                self.width,
                top_k=k,
                first=chunk[:, 3],
                gold=chunk[:, 4],
                log_fraction=fraction,
            )
            mapped += self._write(out, chunk[:, 0], got)
        return mapped

    def _condition(self, picks, consumed, hidden, out: SparseRows, k: int) -> float:
        """Interior rows: the teacher's distribution given the bytes of its token already written."""
        mapped, device = 0.0, hidden.device
        for start in range(0, len(picks), ROW_CHUNK):
            chunk = torch.tensor(picks[start : start + ROW_CHUNK], dtype=torch.long, device=device)
            row_of, teacher_ids, targets = [], [], []
            for r, (pick, written) in enumerate(zip(picks[start : start + ROW_CHUNK], consumed[start:])):
                ids, goes_to = self.continuations(written)
                first, gold = pick[3], pick[4]
                row_of += [r] * len(ids)
                teacher_ids += ids
                targets += [gold if i == first else t for i, t in zip(ids, goes_to)]
            logits = self.inner.head_logits(hidden[chunk[:, 1], chunk[:, 2]]).float()
            got = project_pairs(
                logits,
                torch.tensor(row_of, dtype=torch.long, device=device),
                torch.tensor(teacher_ids, dtype=torch.long, device=device),
                torch.tensor(targets, dtype=torch.long, device=device),
                self.width,
                top_k=k,
                teacher_vocab=self.map.shape[0],
            )
            mapped += self._write(out, chunk[:, 0], got)
        return mapped

    @staticmethod
    def _write(out: SparseRows, rows: torch.Tensor, got) -> float:
        out.ids[rows], out.log_probs[rows], out.tail[rows] = got.ids, got.log_probs, got.tail
        return float(got.mapped_mass.sum())

    def _hidden(self, views, device) -> torch.Tensor:
        width = max(len(v.teacher_ids) for v in views)
        ids = torch.full((len(views), width), self.pad_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(ids)
        for b, view in enumerate(views):
            ids[b, : len(view.teacher_ids)] = torch.tensor(view.teacher_ids, dtype=torch.long)
            attention[b, : len(view.teacher_ids)] = 1
        inner = self.inner
        inner.model.eval()
        if getattr(inner, "offload", False):
            inner.model.to(device)
        try:
            return final_hidden_states(inner.model, {"input_ids": ids, "attention_mask": attention})
        finally:
            if getattr(inner, "offload", False):
                inner.model.to("cpu")

    def _chain_fractions(self, hidden, views, chunk) -> torch.Tensor:
        """(n,) log Π p(t_{i+k} | context), k = 1 .. r-1, for the chunk's CHAIN rows (0 for the others)."""
        lengths = chunk[:, 6]
        fraction = torch.zeros(chunk.shape[0], device=chunk.device)
        longer = (lengths > 1).nonzero().flatten().tolist()
        for (
            r
        ) in longer:  # CHAIN spans are rare (a student token made of several teacher tokens): one at a time
            b, start, length = int(chunk[r, 1]), int(chunk[r, 5]), int(lengths[r])
            positions = torch.arange(start, start + length - 1, device=chunk.device)  # predict start+1 ..
            targets = torch.tensor(views[b].teacher_ids[start + 1 : start + length], device=chunk.device)
            log_p = torch.log_softmax(self.inner.head_logits(hidden[b, positions]).float(), dim=-1)
            token_lp = torch.cat([log_p.new_zeros(1), log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)])
            fraction[r] = chain_log_fraction(token_lp, torch.tensor([0]), torch.tensor([length]))[0]
        return fraction

    def hidden_rows(self, batch, mask):
        raise NotImplementedError(f"teacher {self.spec.name!r}: its hidden states are on its own tokens")

    def head_logits(self, hidden, out=None):
        raise NotImplementedError(f"teacher {self.spec.name!r}: its logits are over its own vocabulary")

    def generate(self, **kwargs):
        raise NotImplementedError(
            f"teacher {self.spec.name!r} has another tokenizer than the student: it cannot write seq_kd samples"
        )


def maybe_cross_tokenizer(teacher, cfg, student_tokenizer, examples):
    """`teacher` itself when it shares the student's tokenizer (and cross_tokenizer is not "on"), else the same
    model behind a CrossTokenizerTeacher; preflight has refused the pair already when it may not be distilled."""
    from easydistill.model_files import embedding_rows
    from easydistill.models import load_tokenizer

    d = cfg.distillation
    theirs = load_tokenizer(teacher.spec.path, cfg.models.trust_remote_code)
    if d.cross_tokenizer != "on" and same_vocabulary(theirs, student_tokenizer):
        return teacher
    if d.cross_tokenizer == "off" or examples is None:
        raise ValueError(f"teacher {teacher.spec.name!r}: its tokenizer differs from the student's")
    pair = CrossPair(student_tokenizer, theirs, cfg.dataset.template)
    width = embedding_rows(cfg.models.student)
    return CrossTokenizerTeacher(teacher, pair, examples, student_width=width, top_k=d.cross_tokenizer_top_k)


def cross_tokenizer_logs(teachers, reduce, device=None) -> dict[str, float]:
    """Per cross-tokenizer teacher, since the last log (summed over ranks with `reduce(tensor, reduction)`):
    the share of label positions with a teacher row, and the teacher mass those rows put on student ids."""
    logs = {}
    for teacher in teachers:
        if not isinstance(teacher, CrossTokenizerTeacher):
            continue
        counts = torch.tensor(list(teacher.take_counts().values()), device=device)
        counts = reduce(counts, reduction="sum").tolist()
        labels, aligned, mapped = counts
        name = teacher.spec.name
        logs[f"aligned_positions/{name}"] = aligned
        logs[f"aligned_share/{name}"] = round(aligned / max(labels, 1.0), 4)
        logs[f"mapped_mass/{name}"] = round(mapped / max(aligned, 1.0), 4)
    return logs
