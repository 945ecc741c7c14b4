"""The KD loop: a Hugging Face Trainer whose loss mixes cross-entropy with the teachers' divergence.

One step: batch -> student forward -> each teacher's logits -> per-token sums -> divide by the valid tokens of
the whole optimizer step (every micro-batch, every rank) -> backward. Trainer brings accumulation, DDP/FSDP/
DeepSpeed through accelerate, checkpoints, resume, the progress bar and the loggers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from transformers import Trainer, TrainerCallback

from easydistill.teachers.cross_tokenizer import cross_tokenizer_logs
from easydistill.train.checkpoints import CrashSafeCheckpoints
from easydistill.train.finite import FiniteSteps
from easydistill.train.on_policy import is_on_policy, on_policy_settings, sample_completions, student_generate
from easydistill.train.step import choose_loss_path, kd_step
from easydistill.train.timing import PARTS, StepClock

# What KDTrainer sums between two logs (order of its running-sums vector).
SUMS = (
    "ce",
    "label_tokens",
    "input_tokens",
    "micro_batches",
    "on_policy",
    "generated_tokens",
    "kd",
)


class KDTrainer(CrashSafeCheckpoints, FiniteSteps, Trainer):
    """Trainer with total = ((1 - kd_ratio) * CE_sum + kd_ratio * KD_sum) / N_step.

    `training_step` decides which batch a micro-step trains on (the data, or completions sampled on-policy /
    by the teacher); `compute_loss` computes it: one `kd_step` (train/step.py) and the normalisation. KD_sum
    combines the teachers (loss/combine.py); N_step is the number of label tokens in the whole optimizer step,
    over every micro-batch and rank, so that the loss does not depend on how a step is split.
    """

    # compute_loss divides by the step's token count itself, so Trainer must not divide by the GA steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss, teachers=(), on_policy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers = list(teachers)
        # config.KDLoss, built once from the config (cfg.loss); nothing to distil from without a teacher
        self.loss = loss if self.teachers else replace(loss, kd_ratio=0.0)
        # chunk_size "auto" becomes a number here; loss_path_line says which path the run takes and why.
        chunk_size, self.loss_path_line = choose_loss_path(
            self.loss.chunk_size,
            self.model,
            self.teachers,
            self.args.device,
            device_memory=_device_memory(self.args.device),
        )
        self.loss = replace(self.loss, chunk_size=chunk_size)
        # Trainer counts the valid tokens of every optimizer step (all micro-batches, gathered over ranks)
        # only for models that take loss kwargs; our loss always uses that count.
        self.model_accepts_loss_kwargs = True
        self.on_policy = on_policy  # OnPolicySettings or None
        self._micro = (-1, 0)  # (global step, micro-batch index within it)
        self._lmbda = 0.0
        self._source = None  # who sampled the current micro-batch
        # Running sums between two logs, see SUMS; then the kd of each teacher.
        self._sums = torch.zeros(len(SUMS) + len(self.teachers), dtype=torch.float64, device=self.args.device)
        self.clock = StepClock(self.args.device)  # seconds per part of the steps since the last log
        self._log_clock, self._log_step = time.perf_counter(), 0
        self.add_callback(_StartClock(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Which batch: on-policy micro-batches swap the data's for completions sampled for its prompts."""
        start, timed = self.clock.now(), sum(self.clock.seconds.values())
        self._source = None
        if self.on_policy is not None:
            inputs, self._source = self._sampled_batch(model, self._prepare_inputs(inputs))
        loss = super().training_step(model, inputs, num_items_in_batch)
        # What neither sampling nor compute_loss timed is the backward (and the few lines of Trainer around it).
        untimed = self.clock.now() - start - (sum(self.clock.seconds.values()) - timed)
        self.clock.seconds["student_backward"] += untimed
        return loss

    def _sampled_batch(self, model, inputs) -> tuple[dict, str | None]:
        """(batch to train on, which policy sampled it or None)."""
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1) if self._micro[0] == step else (step, 0)
        settings = self.on_policy
        self._lmbda = settings.schedule.value(step, self.state.max_steps)
        student_turn = is_on_policy(self._lmbda, self.args.seed, step, self._micro[1])
        if not (student_turn or settings.seq_kd):
            return inputs, None
        if student_turn:
            generate, source = student_generate(self.accelerator.unwrap_model(model)), "student"
        else:
            generate, source = max(self.teachers, key=lambda t: t.spec.weight).generate, "teacher"
        with self.clock.part("generation"):
            batch = sample_completions(generate, inputs, **settings.sampling)
        return batch, source

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        source = self._source if model.training else None
        # The student's own samples are scored by divergence alone (GKD); CE on them would teach nothing.
        loss_spec = replace(self.loss, kd_ratio=1.0) if source == "student" else self.loss
        # Trainer's evaluation asks for outputs but keeps the logits only for compute_metrics: without it the
        # evaluation loss takes the training step's path too ({} below: no logits for prediction_step to keep).
        full_logits = return_outputs and self.compute_metrics is not None
        clock = self.clock if model.training else None
        sums = kd_step(model, inputs, self.teachers, loss_spec, return_outputs=full_logits, clock=clock)
        n_tokens = sums.n_tokens
        if source is not None:
            # Sampled lengths are unknown before sampling, so a generated micro-batch is its own token mean,
            # averaged over the step's micro-batches (and over ranks by DDP).
            loss = sums.objective / max(n_tokens, 1) / self.current_gradient_accumulation_steps
        else:
            loss = sums.objective / (
                num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
            )
            if (
                self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1
                and num_items_in_batch is not None
            ):
                # The denominator already counts every rank's tokens; DDP averages gradients over ranks.
                loss = loss * self.accelerator.num_processes
        if model.training:
            self._add_sums(sums, inputs, source)
        return (loss, sums.outputs if full_logits else {}) if return_outputs else loss

    def _add_sums(self, sums, inputs, source) -> None:
        counts = [
            sums.n_tokens,
            inputs["attention_mask"].sum(),
            1,
            source == "student",
            sums.n_tokens if source else 0,
        ]
        ce = sums.ce_sum.detach()
        step = [ce, *map(ce.new_tensor, map(float, counts)), sums.kd_sum.detach(), *sums.own_sums]
        self._sums += torch.stack([v.double() for v in step]).to(self._sums.device)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        super()._maybe_log_save_evaluate(*args, **kwargs)
        # Evaluation and checkpoints are not training: the throughput clock skips them (log() resets the
        # clock when it runs in between, so only what follows it is skipped).
        self._log_clock += time.perf_counter() - max(start, self._log_clock)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log; every rank logs together, so the reduce below is safe
            parts = self._sums.new_tensor(self.clock.take())
            totals = self.accelerator.reduce(torch.cat([self._sums, parts]), reduction="sum").tolist()
            sums, per_teacher = dict(zip(SUMS, totals)), totals[len(SUMS) : len(SUMS) + len(self.teachers)]
            n = max(sums["label_tokens"], 1.0)
            logs["ce_loss"] = round(sums["ce"] / n, 6)
            if self.teachers:
                logs["kd_loss"] = divergence_for_log(sums["kd"] / n)
                if len(self.teachers) > 1:
                    for teacher, value in zip(self.teachers, per_teacher):
                        logs[f"kd_loss/{teacher.spec.name}"] = divergence_for_log(value / n)
                logs.update(cross_tokenizer_logs(self.teachers, self.accelerator.reduce, self.args.device))
            now = time.perf_counter()
            elapsed = max(now - self._log_clock, 1e-9)
            steps = max(self.state.global_step - self._log_step, 1)
            # Seconds per optimizer step of each part, averaged over the processes (docs/performance.md).
            ranks = self.accelerator.num_processes
            split = {p: v / ranks / steps for p, v in zip(PARTS, totals[-len(PARTS) :])}
            logs["tokens_per_second"] = round(sums["input_tokens"] / elapsed, 1)
            logs["step_seconds"] = round(elapsed / steps, 4)
            for part, seconds in split.items():
                if part != "generation" or self.on_policy is not None:
                    logs[f"time/{part}"] = round(seconds, 4)
            logs["time/other"] = round(max(elapsed / steps - sum(split.values()), 0.0), 4)
            if self.on_policy is not None:
                logs["lmbda"] = round(self._lmbda, 6)
                logs["on_policy_fraction"] = round(sums["on_policy"] / max(sums["micro_batches"], 1.0), 4)
                logs["generated_tokens"] = sums["generated_tokens"]
                logs["generation_time_share"] = round(split["generation"] * steps / elapsed, 4)
            self._log_clock, self._log_step = now, self.state.global_step
            self._sums.zero_()
        super().log(logs, start_time)


class _StartClock(TrainerCallback):
    """Throughput counts from the first step (not from the setup before it), and from a resumed step on."""

    def __init__(self, trainer: KDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._log_clock, self.trainer._log_step = time.perf_counter(), state.global_step


def _device_memory(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _hub_token_to_environment(token) -> None:
    """The hub reads HF_TOKEN; kept out of TrainingArguments, the token is never pickled into training_args.bin."""
    import os

    from easydistill.redact import REDACTED

    if token and token != REDACTED:
        os.environ["HF_TOKEN"] = token


def divergence_for_log(value: float) -> float:
    """A divergence is never negative; float error leaves a true 0 a hair below it (logged as -0): clamp that.
    A clearly negative value stays visible, as the bug it would be."""
    rounded = round(value, 6)
    return 0.0 if -1e-4 < rounded <= 0.0 else rounded


def training_arguments(cfg):
    """TrainingArguments from the `training` block; the keys we own or map are taken out first."""
    from transformers import TrainingArguments

    from easydistill.config.training_keys import OWN_KEYS, SFT_KEYS

    values = {k: v for k, v in cfg.training.as_dict().items() if k not in OWN_KEYS and k not in SFT_KEYS}
    values.pop("resume_from_checkpoint", None)  # passed to train(), where Trainer reads it
    _hub_token_to_environment(values.pop("hub_token", None))
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

    from easydistill.data import KDCollator, TokenizedDataset
    from easydistill.errors import UserError
    from easydistill.models import load_student, load_tokenizer, trainable_summary
    from easydistill.runtime import print0
    from easydistill.store.precompute import training_examples
    from easydistill.teachers import build_teachers
    from easydistill.train import engines

    hf_logging.disable_progress_bar()  # per-file loading bars; the training bar is Trainer's own
    args = training_arguments(cfg)
    asked = engines.check_launch(args)  # before any weight loads: an engine that cannot run stops here
    set_seed(args.seed)
    m = cfg.models
    tokenizer = load_tokenizer(m.student, m.trust_remote_code)
    with args.main_process_first(desc="tokenizing"):  # one process tokenizes, the others map its files
        train_examples, eval_examples, stats = training_examples(cfg, tokenizer)
    print0(f"data: {stats.summary()}; {len(train_examples)} train / {len(eval_examples)} eval examples")
    if not train_examples:
        raise UserError(f"$.dataset.labeled_path: no training example left ({stats.summary()})")

    student = load_student(cfg)
    examples = {"train": train_examples, "eval": eval_examples}
    teachers = build_teachers(cfg, student, args.device, tokenizer=tokenizer, examples=examples)
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
        loss=cfg.loss,
        on_policy=on_policy_settings(cfg, tokenizer, student),
        skip_nonfinite_steps=cfg.training.skip_nonfinite_steps or 0,
    )
    engines.force_fsdp_for_tests(trainer)
    trainer.engine = engines.setup(trainer, cfg, asked)  # the engine in force, teachers placed, one line
    print0(trainer.loss_path_line)
    return KDRun(cfg, trainer, tokenizer, train_examples, eval_examples, stats)


def run_training(cfg, report=None, *, reference=None) -> dict:
    """Build data, student and teachers from a checked config, train, export. Returns the final metrics.

    A full disk, a read-only mount or a permission problem while writing ends as one UserError (exit 2).
    reference: an optional `evaluation.exact_match.Reference` for the run report's exact match (a task that
    knows its right answers better than the eval labels; the quickstart's)."""
    from easydistill.errors import file_system_errors

    run = prepare_run(cfg)
    trainer, m = run.trainer, cfg.models
    with file_system_errors(cfg.output_dir):
        return _train_and_export(cfg, run, trainer, m, reference)


def _train_and_export(cfg, run, trainer, m, reference=None) -> dict:
    import json

    from easydistill.atomic import write_text_atomic
    from easydistill.evaluation.report import attach_report
    from easydistill.export import merge_adapter
    from easydistill.models import outside_zero3_init
    from easydistill.run_folder import check_resume, stamp, start_run
    from easydistill.runtime import is_main_process, print0
    from easydistill.train.checkpoints import (
        already_finished,
        clear_interrupted,
        finished_metrics,
        mark_complete,
        plan_resume,
        staged_export,
    )
    from easydistill.train.engines import write_engine_file

    # Which checkpoint to resume from: the newest complete one (read before anything is changed).
    plan = plan_resume(cfg.training.resume_from_checkpoint, cfg.output_dir)
    if plan.checkpoint:  # it must be this run's (checked before any marker is rewritten)
        check_resume(cfg, plan.checkpoint)
    if is_main_process():
        identity = start_run(cfg, log=print0)  # models and data are loaded: the run is known to start
        trainer.checkpoint_writers.append(lambda folder: stamp(folder, identity))
    clear_interrupted(trainer, cfg.output_dir, plan, cfg.training.resume_from_checkpoint, log=print0)
    if plan.nothing_to_do:
        return finished_metrics(cfg.output_dir)
    write_engine_file(trainer, cfg.output_dir)
    # Held-out figures before / after (and at each Trainer evaluation) for report.json, report.md, the plot.
    reporter = attach_report(run, log=print0, reference=reference)
    if reporter is not None and not plan.checkpoint:  # a resumed run's "before" is its checkpoint
        reporter.before()
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    if already_finished(trainer, cfg.output_dir, log=print0):
        return finished_metrics(cfg.output_dir)
    metrics = dict(result.metrics)
    metrics.update({f"data_{k}": v for k, v in vars(run.stats).items()})
    metrics["engine"] = trainer.engine.name
    write_engine_file(trainer, cfg.output_dir, measured=True)  # + each rank's parameter bytes
    if run.eval_examples:
        metrics.update(trainer.evaluate())
    if reporter is not None:
        after = reporter.after()
        metrics.update({f"heldout_{k}": after[k] for k in ("ce", "exact_match") if after.get(k) is not None})
        metrics.update({f"heldout_kl/{name}": v["kl"] for name, v in after["vs"].items()})
    with staged_export(trainer, cfg.output_dir) as staging:  # files appear in output_dir only when complete
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            trainer.state.save_to_json(str(staging / "trainer_state.json"))
    if cfg.lora.enable and cfg.lora.save_merged_model and trainer.is_world_process_zero():
        texts = [run.tokenizer.decode(e.input_ids) for e in (run.eval_examples or run.train_examples)[:4]]
        with outside_zero3_init():  # one rank loads the base whole: zero.Init would wait for the others
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
        write_text_atomic(cfg.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if reporter is not None:
            reporter.write(metrics)
            print0(f"report: {cfg.output_dir / 'report.md'} ({reporter.seconds:.1f} s of evaluation)")
        mark_complete(cfg.output_dir, trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()
    return metrics
