"""Preflight of a teacher whose tokenizer differs from the student's: allowed, refused, or how well it maps.

Reads tokenizer files and the first records only (no torch, no transformers, no weights): the vocabulary
overlap (share of the student's entries some teacher entry matches exactly) and the share of response
characters in aligned tokens. A folder with no tokenizer.json (a sentencepiece model only) is read through
transformers, the one slow case.
"""

from __future__ import annotations

RECORDS_CHECKED = 8  # records of the labeled file whose alignment validate reports


def _first_records(cfg) -> list[dict]:
    from pathlib import Path

    from easydistill.data import load_records
    from easydistill.errors import UserError

    path = cfg.dataset.labeled_path
    if not path or not Path(path).is_file():
        return []
    try:
        return load_records(path)[:RECORDS_CHECKED]
    except UserError:  # reported by the data checks
        return []


def _tokenizer(path: str, trust_remote_code: bool):
    from easydistill.data.file_tokenizer import FileTokenizer

    tokenizer = FileTokenizer.load(path)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return tokenizer


def check_cross_pair(
    cfg, where: str, student_path: str, teacher_path: str, problems: list[str], notes: list[str]
):
    """Refuse the pair (a problem naming the JSON path) or note how it will be distilled."""
    from easydistill.data.cross_pair import CrossPair
    from easydistill.errors import UserError

    d = cfg.distillation
    try:
        student = _tokenizer(student_path, cfg.models.trust_remote_code)
        teacher = _tokenizer(teacher_path, cfg.models.trust_remote_code)
    except Exception as exc:  # a broken tokenizer file is the user's to fix
        problems.append(
            f"{where}: cannot read the tokenizers of {student_path!r} and {teacher_path!r}: {exc}"
        )
        return
    sizes = f"teacher {len(teacher)} tokens, student {len(student)}"
    if d.cross_tokenizer == "off":
        problems.append(
            f"{where}: the teacher's tokenizer differs from the student's ({sizes}); distillation.cross_tokenizer "
            'is "off", which needs one shared tokenizer (set it to "auto" to distil across tokenizers)'
        )
        return
    try:
        pair = CrossPair(student, teacher, cfg.dataset.template)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return
    if d.seq_kd:
        problems.append(
            f"{where}: distillation.seq_kd samples completions from the teacher, in its own tokens; a teacher with "
            "another tokenizer than the student's cannot write them (use lmbda: the student samples, the teacher scores)"
        )
        return
    vmap = pair.vocab_map
    if vmap.overlap < d.cross_tokenizer_min_overlap:
        problems.append(
            f"{where}: only {vmap.overlap:.1%} of the student's vocabulary matches a teacher entry ({sizes}), below "
            f"distillation.cross_tokenizer_min_overlap = {d.cross_tokenizer_min_overlap:g}: too little to distil from"
        )
        return
    line = f"{where}: cross-tokenizer distillation ({sizes}): {vmap.summary()}"
    records = _first_records(cfg)
    if records:
        try:
            counts, outside = pair.record_counts(records, cfg.max_length)
        except UserError as exc:
            problems.append(f"{where}: {exc}")
            return
        line += f"; first {len(records)} records: {counts.summary()}"
        if outside:
            line += f"; {outside} label tokens after a special token the teacher has no counterpart for"
    notes.append(line)
