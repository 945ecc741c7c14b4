"""Crash-safe checkpoints and final exports, and a resume that trusts only complete checkpoints.

What a kill (SIGKILL, a power cut, the out-of-memory killer) can leave behind, and what the next run does:
- A checkpoint is written by the Trainer and its engine (plain, DDP, FSDP or DeepSpeed: whatever they write)
  into a hidden sibling, `output_dir/.checkpoint-N.partial/checkpoint-N/`; once every rank has finished, the
  folder gets a manifest of its file sizes and is renamed to `output_dir/checkpoint-N/`. So a
  `checkpoint-N/` folder always holds a complete checkpoint.
- The final export goes through `output_dir/.final.partial/`, then file by file into output_dir (each rename
  atomic, weights last); `easydistill_complete.json`, written after everything else, says the run finished.
- `resume_from_checkpoint: true` takes the newest complete checkpoint, removing torn ones (a manifest that
  does not match, no trainer_state.json) with a warning; starts from step 0, saying so, when there is none;
  and does nothing when the run has finished. Resuming a checkpoint whose step is already the last one takes
  no optimizer step (Trainer would take one more): it only writes the export the kill interrupted.
- Temporary folders a killed run left behind are removed when the next run in the same output_dir starts.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from easydistill.atomic import remove_stale_partials, replace_path, write_text_atomic
from easydistill.errors import UserError
from easydistill.faults import kill_point
from easydistill.runtime import print0

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
MANIFEST = "easydistill_checkpoint.json"  # inside a checkpoint: {"files": {relative path: size}}
COMPLETE = "easydistill_complete.json"  # inside output_dir: the final export is complete
FINAL_STAGING = ".final.partial"
TRAINER_STATE = "trainer_state.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


# ---------------------------------------------------------------- what is complete


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        json.loads((path / TRAINER_STATE).read_text())["global_step"]
    except FileNotFoundError:
        return f"no {TRAINER_STATE}: its save was interrupted"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {TRAINER_STATE}"
    if not (path / MANIFEST).is_file():
        return None  # written by another tool or an older version: trainer_state.json is the last file
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} written"
    return None


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, complete or not, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(CHECKPOINT_NAME.match(p.name), p) for p in output_dir.iterdir() if p.is_dir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    return next((p for _, p in reversed(checkpoints(output_dir)) if checkpoint_problem(p) is None), None)


def finished_step(output_dir: Path) -> int | None:
    """The step a finished run ended at (its easydistill_complete.json), or None."""
    try:
        return int(json.loads((Path(output_dir) / COMPLETE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finished_metrics(output_dir: Path) -> dict:
    """The metrics a finished run wrote (empty when there are none)."""
    try:
        return json.loads((Path(output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _manifest(folder: Path) -> dict:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"files": files}


# ---------------------------------------------------------------- resume


@dataclass
class ResumePlan:
    checkpoint: str | None = None  # what Trainer resumes from; None: step 0
    torn: list[tuple[Path, str]] = field(default_factory=list)
    nothing_to_do: bool = False  # the run finished and there is no checkpoint to continue from


def plan_resume(resume, output_dir: Path) -> ResumePlan:
    """Which checkpoint `training.resume_from_checkpoint` means; reads the folder, changes nothing."""
    if not resume:
        return ResumePlan()
    if resume is not True:
        problem = checkpoint_problem(Path(resume))
        if problem:
            complete = [str(p) for _, p in checkpoints(Path(resume).parent) if checkpoint_problem(p) is None]
            hint = f"; complete ones there: {', '.join(complete)}" if complete else ""
            raise UserError(
                f"$.training.resume_from_checkpoint: {resume} is not a complete checkpoint ({problem}){hint}"
            )
        return ResumePlan(str(resume))
    plan = ResumePlan()
    for _, path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem:
            plan.torn.append((path, problem))
        elif plan.checkpoint is None:
            plan.checkpoint = str(path)
    plan.nothing_to_do = plan.checkpoint is None and finished_step(output_dir) is not None
    return plan


def clear_interrupted(trainer, output_dir: Path, plan: ResumePlan, resume, log=print) -> None:
    """Before training: remove what a killed run left (temporary folders, torn checkpoints), say what happens.

    Every rank has read the folder (plan_resume) before this changes it, so all resume from the same checkpoint.
    """
    output_dir = Path(output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for path in remove_stale_partials(output_dir):
            log(f"removed {path.name}, left in {output_dir} by an interrupted run")
        for path, problem in plan.torn:
            log(f"warning: resume: skipping and removing torn {path} ({problem})")
            shutil.rmtree(path, ignore_errors=True)
        if not resume:
            (output_dir / COMPLETE).unlink(missing_ok=True)  # a new run: the old one's outputs are replaced
    trainer.accelerator.wait_for_everyone()
    if plan.nothing_to_do:
        log(
            f"resume: {output_dir} finished at step {finished_step(output_dir)} and holds no checkpoint to "
            "continue from; nothing to do"
        )
    elif resume is True and plan.checkpoint is None:
        log(f"resume: no complete checkpoint in {output_dir}; starting from step 0")


def already_finished(trainer, output_dir: Path, log=print) -> bool:
    """After train(): True when a resumed run had nothing left to do (its export is complete too)."""
    if not trainer.finished_before_start:
        return False
    step = trainer.state.global_step
    if finished_step(output_dir) == step:
        log(f"resume: {output_dir} finished at step {step}; nothing to do")
        return True
    log(
        f"resume: {trainer.resumed_from} is at step {step} of {trainer.state.max_steps}: training is complete; "
        "writing the final export the interruption left undone"
    )
    return False


class _AlreadyFinished(Exception):
    pass


class _Guard(TrainerCallback):
    """Says where a resumed run continues from; stops Trainer before it takes a step past the last one.
    Also the test-only kill point "step": gradients computed, weights not yet updated."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.resumed_from is None:
            return
        if state.global_step >= state.max_steps:
            raise _AlreadyFinished
        print0(f"resume: from {trainer.resumed_from} (step {state.global_step} of {state.max_steps})")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        kill_point("step", state.global_step + 1)


# ---------------------------------------------------------------- the Trainer side


class CrashSafeCheckpoints:
    """Trainer mixin: checkpoints appear complete or not at all; a finished checkpoint is never trained on."""

    _staging_root: str | None = None
    resumed_from: str | None = None
    finished_before_start = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Called with a checkpoint folder while it is still temporary, so that what they add (e.g. a run id)
        # is part of the checkpoint from the moment it is complete.
        self.checkpoint_writers: list = []
        self.add_callback(_Guard(self))

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, Trainer (and the engine under it) write into the temporary sibling.
        return self._staging_root or super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self._staging_root is not None:
            kill_point("checkpoint_save", self.state.global_step)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{name}.partial"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank's files (rng states, shards) are in place
        if self.args.should_save:
            kill_point("checkpoint_publish", self.state.global_step)
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staging / name / TRAINER_STATE))
            for write in self.checkpoint_writers:
                write(staging / name)
            write_text_atomic(staging / name / MANIFEST, json.dumps(_manifest(staging / name), indent=1))
            replace_path(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        self.resumed_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        self.finished_before_start = False
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        except _AlreadyFinished:
            self.finished_before_start = True
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            losses = [e["train_loss"] for e in self.state.log_history if "train_loss" in e]
            metrics = {"train_loss": losses[-1]} if losses else {}
            return TrainOutput(self.state.global_step, metrics.get("train_loss", 0.0), metrics)


# ---------------------------------------------------------------- the final export


def _weights_last(path: Path) -> tuple[bool, str]:
    return path.name.endswith(WEIGHT_SUFFIXES), path.name


@contextmanager
def staged_export(trainer, output_dir: Path):
    """A temporary folder for the final files; on success they move into output_dir, weights last."""
    output_dir = Path(output_dir)
    staging = output_dir / FINAL_STAGING
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    yield staging
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        kill_point("final_save")
        for i, entry in enumerate(sorted(staging.iterdir(), key=_weights_last)):
            replace_path(entry, output_dir / entry.name)
            if i == 0:
                kill_point("final_publish")
        staging.rmdir()
    trainer.accelerator.wait_for_everyone()


def mark_complete(output_dir: Path, step: int) -> None:
    """The last file a run writes: its outputs are final."""
    write_text_atomic(Path(output_dir) / COMPLETE, json.dumps({"global_step": step}) + "\n")
