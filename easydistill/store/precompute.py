"""What the teacher computes before training: answers for prompt-only data, and top-k logits stores.

    python -m easydistill.kd.infer --config x.json                         # what the config needs
    python -m easydistill.kd.infer --config x.json --import-v1 logits.json # convert an EasyDistill v1 file

`prepare_teacher_outputs(cfg)` runs in kd.infer and at the start of kd.train: (1) when the teacher must write the
data, generate it (easydistill/store/answers.py); (2) for every teacher with a `logits_path`, make sure a complete
store exists there: keep a complete one, convert a v1 JSONL file, or score the training token ids with the
teacher (kd_white_box, or kd.infer for any job). Scoring reuses `data.build_dataset`, so the stored rows
describe exactly the ids training sees, train and eval examples alike. See docs/logits.md.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from easydistill.data import SPLITS, DataStats, KDCollator, TokenizedExample, build_dataset, tokenized_hash
from easydistill.errors import UserError
from easydistill.store.topk import (
    StoreWriter,
    is_complete,
    partial_path,
    sample_list,
    store_location,
    vocab_width,
)

ROW_CHUNK = 1024  # label rows per log_softmax: bounds the fp32 copy of the logits for large vocabularies


def training_examples(cfg, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample], DataStats]:
    """(train, eval, stats): the one place examples are built, for scoring and for training alike (same split,
    truncation and max_samples), so that stored rows always describe the tokens training sees."""
    train, evaluation, stats = build_dataset(
        cfg.dataset.labeled_path,
        tokenizer,
        template_path=cfg.dataset.template,
        max_length=cfg.max_length,
        eval_ratio=cfg.dataset.eval_ratio,
        eval_path=cfg.dataset.eval_path,
        seed=cfg.dataset.seed,
    )
    if cfg.dataset.max_samples:
        train = train[: cfg.dataset.max_samples]
    return train, evaluation, stats


@torch.no_grad()
def top_k_rows(logits: torch.Tensor, mask: torch.Tensor, top_k: int, width: int):
    """(B, T, V) logits, (B, T-1) label mask -> ids (N, k) int64, log_probs (N, k) fp32, tail (N,) fp32.

    Raw log_softmax at temperature 1 over the first `width` columns; tail = log of the mass outside the k.
    """
    rows = logits[:, :-1][mask]  # (N, V): row i predicts the i-th label token, as the student's row i
    out_ids, out_lp, out_tail = [], [], []
    for chunk in rows.split(ROW_CHUNK):
        log_p = torch.log_softmax(chunk[:, :width].float(), dim=-1)  # (n, W)
        top, ids = log_p.topk(top_k, dim=-1)
        tail = torch.logsumexp(log_p.scatter(-1, ids, -torch.inf), dim=-1)  # exact, not 1 - Σ top
        out_ids.append(ids)
        out_lp.append(top)
        out_tail.append(tail)
    empty = rows.new_zeros((0, top_k))
    return (
        torch.cat(out_ids) if out_ids else empty.long(),
        torch.cat(out_lp) if out_lp else empty.float(),
        torch.cat(out_tail) if out_tail else empty[:, 0].float(),
    )


def score_into_store(
    model,
    tokenizer,
    train,
    evaluation,
    store,
    *,
    top_k,
    width,
    batch_size,
    shard_bytes=None,
    source="",
    progress=True,
    cross=None,
) -> Path:
    """Teacher-forced forward over every train and eval example; one forward per `batch_size` examples.

    cross: a CrossTokenizerTeacher over `model`, when its tokenizer is not the student's: its rows (already on the
    student's vocabulary) are stored, with the vocabulary map's hash in the index."""
    from tqdm.auto import tqdm

    writer = StoreWriter(
        store,
        top_k=top_k,
        vocab_width=width,
        samples=sample_list(train, evaluation),
        source=source,
        shard_bytes=shard_bytes,
        vocab_map=None if cross is None else cross.map_hash,
    )
    todo = [
        (s, ex)
        for s, exs in (("train", train), ("eval", evaluation))
        for ex in exs
        if not writer.done(s, ex.sample_id)
    ]
    todo.sort(key=lambda item: len(item[1].input_ids))  # similar lengths batch together: less padding
    collate = KDCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total = len(train) + len(evaluation)
    with tqdm(total=total, initial=total - len(todo), desc="teacher logits", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = collate([ex for _, ex in chunk])
            mask = batch["labels"][:, 1:] != -100  # (B, T-1)
            if cross is None:
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                rows = top_k_rows(logits, mask.to(device), top_k, width)
            else:
                batch["sample_split"] = torch.tensor([SPLITS.index(split) for split, _ in chunk])
                batch["sample_index"] = torch.tensor([ex.sample_index for _, ex in chunk])
                found = cross.rows({k: v.to(device) for k, v in batch.items()}, mask.to(device))
                rows = (found.ids, found.log_probs, found.tail)
            ids, log_probs, tail = (t.cpu().numpy() for t in rows)
            first = 0
            for (split, ex), n in zip(chunk, mask.sum(1).tolist()):
                rows = slice(first, first + n)
                writer.add(
                    split, ex.sample_id, tokenized_hash(ex.input_ids), ids[rows], log_probs[rows], tail[rows]
                )
                first += n
            bar.update(len(chunk))
    return writer.finish()


def _wait_for(paths: list[Path], what: str) -> None:
    """Ranks other than the first wait for its files (there is no process group before the Trainer)."""
    from easydistill.runtime import print0

    told = False
    while not all(p.exists() for p in paths):
        if not told:
            print0(f"waiting for the first process to finish {what}")
            told = True
        time.sleep(1)


def prepare_teacher_outputs(
    cfg, *, import_v1=None, compute_missing=None, wait=False, shard_bytes=None, log=print
):
    """Make every teacher output the run needs exist; returns the config to train with.

    compute_missing: score missing stores with the teacher model (default: only for kd_white_box).
    wait: do not compute, wait for another process to (non-first ranks of a multi-process launch).
    """
    from transformers.utils import logging as hf_logging

    from easydistill.store import answers as generate

    hf_logging.disable_progress_bar()  # per-file loading bars; ours count examples
    if cfg.job_type in generate.ANSWERING_JOBS and cfg.dataset.instruction_path:
        target = generate.answers_path(cfg)
        if wait:
            _wait_for([target], "the teacher's answers")
        elif not target.is_file():
            generate.write_teacher_answers(cfg, log=log)
        if not cfg.dataset.labeled_path:
            cfg = with_labeled_path(cfg, target)
    cached = [t for t in cfg.teachers if t.kind == "cached"]
    if import_v1 is not None and len(cached) != 1:
        names = ", ".join(t.name for t in cached) or "none"
        raise UserError(
            f"--import-v1 needs exactly one teacher with a logits_path in the config (found: {names})"
        )
    if compute_missing is None:
        compute_missing = cfg.job_type == "kd_white_box"
    shared: dict = {}
    for spec in cached:
        store, v1_file = store_location(cfg, spec)
        if import_v1 is not None:
            v1_file = Path(import_v1)
        if is_complete(store):
            continue
        if wait:
            _wait_for([store], f"the teacher-logits store {store}")
            continue
        if v1_file is not None:
            from easydistill.store.v1_import import import_v1_file

            _, train, evaluation = _examples(cfg, shared)
            log(f"converting EasyDistill v1 logits {v1_file} -> {store}")
            import_v1_file(
                cfg,
                v1_file,
                store,
                train,
                evaluation,
                teacher_path=spec.path,
                shard_bytes=shard_bytes,
                log=log,
            )
        elif compute_missing and spec.path and Path(spec.path).is_dir():
            _score_teacher(cfg, spec, store, shared, shard_bytes, log)
        else:
            resumable = " (or resume the partial one)" if partial_path(store).exists() else ""
            raise UserError(
                f"teacher {spec.name!r}: no complete teacher-logits store at {str(store)!r}; compute it{resumable} with "
                f"python -m easydistill.kd.infer --config <this config>"
                + ("" if spec.path else " (it needs the teacher's model folder in models.teacher)")
            )
    return cfg


def _examples(cfg, shared: dict):
    if not shared:
        from easydistill.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
        shared.update(
            zip(("tokenizer", "train", "eval"), (tokenizer, *training_examples(cfg, tokenizer)[:2]))
        )
    return shared["tokenizer"], shared["train"], shared["eval"]


def _score_teacher(cfg, spec, store: Path, shared: dict, shard_bytes, log) -> None:
    from easydistill.models import load_frozen_teacher

    tokenizer, train, evaluation = _examples(cfg, shared)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_frozen_teacher(spec.path, cfg, device)
    cross = cross_tokenizer_scorer(cfg, spec, model, tokenizer, train, evaluation)
    width = vocab_width(cfg, None if cross else model.config.get_text_config().vocab_size)
    top_k = min(cfg.inference.top_logits_num, width)
    if cross is not None:
        cross.top_k = top_k  # the store's k, not distillation.cross_tokenizer_top_k
    log(
        f"teacher logits: {spec.path} scores {len(train)} train + {len(evaluation)} eval examples, top {top_k} -> {store}"
    )
    score_into_store(
        model,
        tokenizer,
        train,
        evaluation,
        store,
        top_k=top_k,
        width=width,
        batch_size=cfg.inference.batch_size,
        shard_bytes=shard_bytes,
        source=f"kd.infer:{spec.path}",
        cross=cross,
    )
    del model  # the point of a store: the teacher's memory goes back before the student arrives
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cross_tokenizer_scorer(cfg, spec, model, tokenizer, train, evaluation):
    """A CrossTokenizerTeacher over the loaded teacher when its tokenizer is not the student's, else None."""
    from easydistill.teachers.cross_tokenizer import CrossTokenizerTeacher, maybe_cross_tokenizer
    from easydistill.teachers.online import OnlineTeacher

    spec = dataclasses.replace(spec, kind="online")
    teacher = maybe_cross_tokenizer(
        OnlineTeacher(spec, model), cfg, tokenizer, {"train": train, "eval": evaluation}
    )
    return teacher if isinstance(teacher, CrossTokenizerTeacher) else None


def with_labeled_path(cfg, path: Path):
    """The same config reading its training records from `path` (the teacher's answers)."""
    from easydistill.config.load import schema
    from easydistill.config.view import Config

    data = dict(cfg.data)
    data["dataset"] = {**data["dataset"], "labeled_path": str(path)}
    return Config(data, schema(), cfg.source, cfg.warnings)
