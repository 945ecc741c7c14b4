"""The KD loop: a Hugging Face Trainer whose loss mixes cross-entropy with the teachers' divergence.

One step: batch -> student forward -> each teacher's logits -> per-token sums -> divide by the valid tokens of
the whole optimizer step (every micro-batch, every rank) -> backward. Trainer brings accumulation, DDP/FSDP/
DeepSpeed through accelerate, checkpoints, resume, the progress bar and the loggers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

from easydistill.teachers.ensemble import combined_divergence


class KDTrainer(Trainer):
    """Trainer with total = ((1 - kd_ratio) * CE_sum + kd_ratio * KD_sum) / N_step.

    KD_sum combines the teachers (see teachers/ensemble.py); N_step is the number of label tokens in the
    whole optimizer step, over every micro-batch and rank, so that the loss does not depend on how a step
    is split into micro-batches or processes.
    """

    # compute_loss divides by the step's token count itself, so Trainer must not divide by the GA steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        teachers=(),
        kd_ratio=0.5,
        kind="forward_kld",
        beta=0.5,
        skew_alpha=0.1,
        combine="weighted_loss",
        temperature=1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teachers = list(teachers)
        self.kd_ratio = kd_ratio if self.teachers else 0.0
        self.kind, self.beta, self.skew_alpha = kind, beta, skew_alpha
        self.combine, self.temperature = combine, temperature
        # Trainer counts the valid tokens of every optimizer step (all micro-batches, gathered over ranks)
        # only for models that take loss kwargs; our loss always uses that count.
        self.model_accepts_loss_kwargs = True
        # Running sums between two logs: ce, label tokens, input tokens, combined kd, then kd per teacher.
        self._sums = torch.zeros(4 + len(self.teachers), dtype=torch.float64, device=self.args.device)
        self._log_clock = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # Logits at position t predict token t + 1: keep only positions whose next token is a label.
        mask = labels[:, 1:] != -100  # (B, T-1)
        targets = labels[:, 1:][mask]  # (N,)
        student = outputs.logits[:, :-1][mask]  # (N, V_s)
        ce_sum = F.cross_entropy(student.float(), targets, reduction="sum")
        kd_sum, own_sums = ce_sum.new_zeros(()), [ce_sum.new_zeros(()) for _ in self.teachers]
        if self.teachers and self.kd_ratio > 0:
            rows = [teacher.rows(inputs, mask) for teacher in self.teachers]  # each (N, V_t), or sparse
            kd_sum, own_sums = combined_divergence(
                student,
                rows,
                [t.spec.weight for t in self.teachers],
                [t.spec.temperature for t in self.teachers],
                targets,
                combine=self.combine,
                kind=self.kind,
                beta=self.beta,
                skew_alpha=self.skew_alpha,
                student_temperature=self.temperature,
            )
        n_tokens = targets.numel()
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
        loss = ((1.0 - self.kd_ratio) * ce_sum + self.kd_ratio * kd_sum) / denominator
        if (
            self.args.average_tokens_across_devices
            and self.accelerator.num_processes > 1
            and num_items_in_batch is not None
        ):
            # The denominator already counts every rank's tokens; DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        if model.training:
            counts = [float(n_tokens), float(inputs["attention_mask"].sum())]
            step = [ce_sum.detach(), *map(ce_sum.new_tensor, counts), kd_sum.detach(), *own_sums]
            self._sums += torch.stack([v.double() for v in step]).to(self._sums.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log; every rank logs together, so the reduce below is safe
            sums = self.accelerator.reduce(self._sums.clone(), reduction="sum")
            n = max(float(sums[1]), 1.0)
            logs["ce_loss"] = round(float(sums[0]) / n, 6)
            if self.teachers:
                logs["kd_loss"] = round(float(sums[3]) / n, 6)
                if len(self.teachers) > 1:
                    for teacher, value in zip(self.teachers, sums[4:]):
                        logs[f"kd_loss/{teacher.spec.name}"] = round(float(value) / n, 6)
            now = time.perf_counter()
            logs["tokens_per_second"] = round(float(sums[2]) / max(now - self._log_clock, 1e-9), 1)
            self._log_clock = now
            self._sums.zero_()
        super().log(logs, start_time)


def training_arguments(cfg):
    """TrainingArguments from the `training` block; the keys we own or map are taken out first."""
    from transformers import TrainingArguments

    from easydistill.config.training_keys import OWN_KEYS, SFT_KEYS

    values = {k: v for k, v in cfg.training.as_dict().items() if k not in OWN_KEYS and k not in SFT_KEYS}
    values.pop("resume_from_checkpoint", None)  # passed to train(), where Trainer reads it
    values.setdefault("report_to", "none")
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        # Without an accelerator everything runs on the CPU anyway; saying so lets bf16 configs run (CPU
        # autocast) and makes several processes one gloo DDP job instead of independent copies.
        values.setdefault("use_cpu", True)
    # Our collator adds sample_index (teacher rows are found by sample, never by step), which the model's
    # forward does not take: Trainer must not drop it.
    values["remove_unused_columns"] = False
    values["label_names"] = ["labels"]
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as exc:
        from easydistill.errors import UserError

        raise UserError(f"$.training: {exc}") from None


@dataclass
class KDRun:
    """Everything a run is built from, so that tests and tools can step into it."""

    cfg: object
    trainer: KDTrainer
    tokenizer: object
    train_examples: list
    eval_examples: list
    stats: object


def prepare_run(cfg) -> KDRun:
    """Data, student, teachers and the Trainer for a checked config. Nothing is written yet."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from easydistill.cli import print0
    from easydistill.data import KDCollator, TokenizedDataset, build_dataset
    from easydistill.errors import UserError
    from easydistill.models import load_student, load_tokenizer, trainable_summary
    from easydistill.teachers import build_teachers

    hf_logging.disable_progress_bar()  # per-file loading bars; the training bar is Trainer's own
    args = training_arguments(cfg)
    set_seed(args.seed)
    m, d = cfg.models, cfg.distillation
    tokenizer = load_tokenizer(m.student, m.trust_remote_code)
    train_examples, eval_examples, stats = build_dataset(
        cfg.dataset.labeled_path,
        tokenizer,
        template_path=cfg.dataset.template,
        max_length=cfg.max_length,
        eval_ratio=cfg.dataset.eval_ratio,
        eval_path=cfg.dataset.eval_path,
        seed=cfg.dataset.seed,
    )
    if cfg.dataset.max_samples:
        train_examples = train_examples[: cfg.dataset.max_samples]
    print0(f"data: {stats.summary()}; {len(train_examples)} train / {len(eval_examples)} eval examples")
    if not train_examples:
        raise UserError(f"$.dataset.labeled_path: no training example left ({stats.summary()})")

    student = load_student(cfg)
    teachers = build_teachers(cfg, student, args.device)
    print0(f"student: {m.student} ({trainable_summary(student)})")
    for t in teachers:
        if t.spec.kind == "self":
            print0(
                "teacher: self. student = base + LoRA (trainable); teacher = the same base with LoRA disabled "
                "(frozen); one shared copy of the base weights"
            )
        else:
            print0(f"teacher: {t.spec.name} [{t.spec.kind}] {t.spec.path} (weight {t.spec.weight:.3g})")

    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=TokenizedDataset(train_examples),
        eval_dataset=TokenizedDataset(eval_examples) if eval_examples else None,
        data_collator=KDCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        teachers=teachers,
        kd_ratio=d.kd_ratio if cfg.is_white_box else 0.0,
        kind=d.distillation_type,
        beta=d.beta,
        skew_alpha=d.skew_alpha,
        combine=d.combine,
        temperature=d.temperature,
    )
    return KDRun(cfg, trainer, tokenizer, train_examples, eval_examples, stats)


def run_training(cfg, report=None) -> dict:
    """Build data, student and teachers from a checked config, train, export. Returns the final metrics."""
    import json

    from easydistill.cli import is_main_process, print0
    from easydistill.export import merge_adapter
    from easydistill.preflight import RUN_MARKER

    run = prepare_run(cfg)
    trainer, m = run.trainer, cfg.models
    if is_main_process():
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / RUN_MARKER).write_text(cfg.to_json())
    result = trainer.train(resume_from_checkpoint=cfg.training.resume_from_checkpoint or None)
    metrics = dict(result.metrics)
    metrics.update({f"data_{k}": v for k, v in vars(run.stats).items()})
    if run.eval_examples:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(cfg.output_dir))
    trainer.save_state()
    if cfg.lora.enable and cfg.lora.save_merged_model and trainer.is_world_process_zero():
        texts = [run.tokenizer.decode(e.input_ids) for e in (run.eval_examples or run.train_examples)[:4]]
        metrics["merged_max_logit_diff"] = merge_adapter(
            m.student,
            str(cfg.output_dir),
            cfg.output_dir / "merged_model",
            dtype="float32" if m.dtype == "auto" else m.dtype,
            trust_remote_code=m.trust_remote_code,
            texts=texts,
            log=print0,
        )
    if trainer.is_world_process_zero():
        (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return metrics
