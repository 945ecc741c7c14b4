"""Which folder a run may write into, and which run a folder (or a checkpoint) belongs to.

A run never writes into a folder it reads from: not a model folder of the config (student, teachers,
lora.init_from; the same folder, one inside it, or one that holds it, symlinks resolved), not the folder of the
config file or of a data file, and not a non-empty folder that is not an easydistill run. A run folder holds
two markers, written once the run is known to start (models and data loaded): RUN_CONFIG, the resolved config
with its secrets redacted, and RUN_ID, which run this is. Every checkpoint of the run carries the same RUN_ID
file, so that resuming can check the checkpoint belongs to the run (`checkpoint_belongs_to_run`).

Pure Python (no torch): `easydistill.validate` calls `output_dir_problems` before anything loads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

RUN_CONFIG = "easydistill_config.json"  # the resolved config of the run (secrets redacted)
RUN_ID = "easydistill_run.json"  # {"run_id", "written"}: in the run folder and in each of its checkpoints
MERGE_MARKER = "easydistill_merge.json"  # in a merged model written by easydistill.merge
# What kd.infer / kd.train write into output_dir before the run itself starts (generate.DEFAULT_ANSWERS and its
# temporary): a folder holding only these is not someone else's. A rerun keeps them.
PRECOMPUTED = ("teacher_answers.json", ".teacher_answers.json.tmp")
# A run folder with one of these holds something worth keeping: a rerun must resume it or overwrite it.
KEEPABLE = (
    "trainer_state.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
)


def real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(out: Path, folder: Path) -> str | None:
    """How `out` stands to `folder` (both resolved): 'is', 'lies inside' or 'contains', or None."""
    if out == folder:
        return "is"
    if folder in out.parents:
        return "lies inside"
    if out in folder.parents:
        return "contains"
    return None


def model_folders(cfg) -> list[tuple[str, str]]:
    """(JSON path, folder) of every model folder the config reads."""
    found = [("$.models.student", cfg.models.student)]
    teacher = cfg.models.teacher
    for i, spec in enumerate(cfg.teachers):
        if spec.path and os.path.isdir(spec.path):
            found.append(
                ("$.models.teacher" if isinstance(teacher, str) else f"$.models.teacher[{i}]", spec.path)
            )
    if cfg.lora.enable and cfg.lora.init_from:
        found.append(("$.lora.init_from", cfg.lora.init_from))
    return found


def _data_files(cfg) -> list[tuple[str, str]]:
    keys = ["eval_path", "instruction_path", "template"] + ([] if _writes_answers(cfg) else ["labeled_path"])
    return [(f"$.dataset.{k}", getattr(cfg.dataset, k)) for k in keys if getattr(cfg.dataset, k)]


def _writes_answers(cfg) -> bool:
    """The teacher writes dataset.labeled_path from instruction_path before training (generate.ANSWERING_JOBS)."""
    return cfg.job_type in ("kd_white_box", "kd_black_box_local") and bool(cfg.dataset.instruction_path)


def _precomputed_names(cfg, out: Path) -> set[str]:
    """Names, directly inside `out` (resolved), of what the teacher computes before the run: its answers, its
    logits stores (and their temporaries). They are inputs of the run, kept by a rerun and by overwrite."""
    names = set(PRECOMPUTED)
    outputs = [Path(cfg.dataset.labeled_path)] if _writes_answers(cfg) and cfg.dataset.labeled_path else []
    for spec in cfg.teachers:
        if spec.logits_path:
            outputs += [Path(spec.logits_path), Path(spec.logits_path + ".store")]
    for path in outputs:
        if real(path).parent == out:
            names |= {path.name, path.name + ".partial", f".{path.name}.tmp"}
    return names


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUN_CONFIG).is_file() or (Path(folder) / RUN_ID).is_file()


def keepable_entries(folder: str | Path) -> list[str]:
    """What an earlier run left in `folder` that is worth keeping: checkpoints and a saved model or state."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name in KEEPABLE or (p.name.startswith("checkpoint-") and p.is_dir())
    )


def _foreign_entries(cfg, out: Path) -> list[str]:
    ours = _precomputed_names(cfg, real(out))
    return sorted(p.name for p in out.iterdir() if p.name not in ours)


def output_dir_problems(cfg) -> list[str]:
    """Why training.output_dir must not be written, one line per reason (empty: it may be)."""
    where = "$.training.output_dir"
    out, resolved = cfg.output_dir, real(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"{where}: {str(out)!r} exists and is not a folder"]
    problems = []
    for path_key, folder in model_folders(cfg):
        relation = _relation(resolved, real(folder))
        if relation:
            problems.append(
                f"{where}: {str(out)!r} {relation} the model folder {path_key} ({folder!r}); a run never writes "
                "where it reads a model: choose an output folder of its own"
            )
    if cfg.source:
        config_file = real(cfg.source)
        if resolved == config_file.parent and config_file.name != RUN_CONFIG:
            problems.append(
                f"{where}: {str(out)!r} is the folder of the config file itself; the run's own files "
                "(config.json among them) would replace files there: choose an output folder of its own"
            )
    for path_key, file in _data_files(cfg):
        if resolved == real(file).parent:
            problems.append(
                f"{where}: {str(out)!r} is the folder of {path_key} ({file!r}); choose an output folder of its own"
            )
    problems += _unwritable(out, where)
    if problems or not out.is_dir():
        return problems
    resume, overwrite = cfg.training.resume_from_checkpoint, cfg.training.overwrite_output_dir
    if not is_run_folder(out):
        foreign = _foreign_entries(cfg, out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            problems.append(
                f"{where}: {str(out)!r} is not empty ({shown}) and is not an easydistill run; nothing there is "
                "replaced, even with overwrite_output_dir: choose an empty or new folder"
            )
    elif keepable_entries(out) and not resume and not overwrite:
        problems.append(
            f"{where}: {str(out)!r} already holds a run; choose another folder, resume it with "
            "training.resume_from_checkpoint, or set training.overwrite_output_dir to true"
        )
    return problems


def _unwritable(out: Path, where: str) -> list[str]:
    """A read-only file system or a folder without write permission, found before anything loads."""
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return []
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return [f"{where}: {str(out)!r} is on a read-only file system ({str(existing)!r})"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{where}: {str(out)!r} cannot be written: permission denied on {str(existing)!r}"]
    return []


def run_id(folder: str | Path) -> str | None:
    """The run id recorded in a run folder or checkpoint, or None (no marker, or one that cannot be read)."""
    try:
        return json.loads((Path(folder) / RUN_ID).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stamp(folder: str | Path, identity: str) -> None:
    """Record in `folder` (a run folder or one of its checkpoints) which run wrote it."""
    text = json.dumps({"run_id": identity, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    tmp = Path(folder) / f".{RUN_ID}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(folder) / RUN_ID)


def checkpoint_belongs_to_run(checkpoint: str | Path, output_dir: str | Path) -> bool:
    """True when `checkpoint` was written by the run whose folder is `output_dir`.

    Both carry the RUN_ID file; folders from before run ids existed carry none, and then match only each other.
    """
    return run_id(checkpoint) == run_id(output_dir)


def start_run(cfg, log=print) -> str:
    """Make output_dir the folder of this run; returns its run id. Main process only, once models are loaded.

    Fresh run: a new id. Resumed run: the folder's id is kept. overwrite_output_dir on an earlier run: its files
    are removed first (after saying what goes), except the teacher's precomputed outputs, which are inputs.
    """
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    identity = run_id(out) if cfg.training.resume_from_checkpoint else None
    if identity is None and cfg.training.overwrite_output_dir and is_run_folder(out):
        clear_earlier_run(cfg, log)
    (out / RUN_CONFIG).write_text(cfg.to_json())
    if identity is None:
        identity = uuid.uuid4().hex
        stamp(out, identity)
    return identity


def clear_earlier_run(cfg, log=print) -> list[str]:
    """Remove an earlier run's files from output_dir (overwrite_output_dir); returns the names removed."""
    out = cfg.output_dir
    victims = _foreign_entries(cfg, out)
    if not victims:
        return []
    checkpoints = [v for v in victims if v.startswith("checkpoint-")]
    log(
        f"overwrite_output_dir: removing the earlier run in {out} (run {run_id(out) or 'without id'}; "
        f"{len(checkpoints)} checkpoint(s), {len(victims) - len(checkpoints)} other entries)"
    )
    for name in victims:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return victims


def merge_destination_problems(base: str, adapter: str, out: str, overwrite: bool) -> list[str]:
    """Why `merge --out` must not be written: never an input or a training run, replaced only when it is an
    earlier merge output and --overwrite is given. The merged model may go inside the adapter's run folder."""
    problems = replaced_input_problems(base, adapter, out)
    if _relation(real(out), real(base)) == "lies inside":
        problems.append(f"{out}: lies inside the base model folder {base!r}; choose a folder of its own")
    target = Path(out)
    if problems or not target.exists():
        return [f"--out {p}" for p in problems]
    if not target.is_dir():
        return [f"--out {out}: exists and is not a folder"]
    if any(target.iterdir()):
        if not (target / MERGE_MARKER).is_file():
            return [
                f"--out {out}: not empty and not a model easydistill.merge wrote; nothing there is replaced, "
                "even with --overwrite: choose another folder"
            ]
        if not overwrite:
            return [f"--out {out}: holds an earlier merged model; pass --overwrite to replace it"]
    return []


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint-N folder with the highest N in output_dir (what resume_from_checkpoint: true takes)."""
    folder = Path(output_dir)
    steps = [
        (int(p.name.split("-", 1)[1]), p)
        for p in (folder.iterdir() if folder.is_dir() else [])
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit()
    ]
    return max(steps)[1] if steps else None


def check_resume(cfg, resume) -> None:
    """Refuse (UserError) to resume output_dir from a checkpoint in it that another run wrote.

    `resume` is training.resume_from_checkpoint: true (the newest checkpoint) or a path. A path outside
    output_dir is the user's explicit choice (e.g. to continue another run's checkpoint) and is not checked."""
    from easydistill.errors import UserError

    out = cfg.output_dir
    checkpoint = newest_checkpoint(out) if resume is True else Path(resume)
    if checkpoint is None or real(checkpoint).parent != real(out):
        return
    if not checkpoint_belongs_to_run(checkpoint, out):
        raise UserError(
            f"$.training.resume_from_checkpoint: {str(checkpoint)!r} was written by another run "
            f"({run_id(checkpoint) or 'no run id'}) than the one in {str(out)!r} ({run_id(out) or 'no run id'}); "
            "resume from a checkpoint of this run, or start over with training.overwrite_output_dir"
        )


def replaced_input_problems(base: str, adapter: str, out: str | Path) -> list[str]:
    """The floor under every merge, the run's own included: `out` is replaced only when it is neither an input
    (nor holds one) nor a training run."""
    resolved, problems = real(out), []
    for name, folder in (("base model", base), ("adapter", adapter)):
        if _relation(resolved, real(folder)) in ("is", "contains"):
            problems.append(f"{out}: is or holds the {name} folder {folder!r}; a merge never replaces it")
    if Path(out).is_dir() and is_run_folder(out):
        problems.append(f"{out}: holds a training run, which a merge never replaces")
    return problems


def eval_output(cfg, out: str | None, overwrite: bool) -> Path | None:
    """Where `easydistill.eval` writes its JSON: `out` when given (an existing file only with --overwrite, never
    an input of the config), else a new eval[-N].json in output_dir when that is a run folder; None: print only.
    Raises UserError before anything is evaluated."""
    from easydistill.errors import UserError

    if out is None:
        if not is_run_folder(cfg.output_dir):
            return None
        names = ("eval.json", *(f"eval-{n}.json" for n in range(2, 10_000)))
        return next(cfg.output_dir / n for n in names if not (cfg.output_dir / n).exists())
    target, resolved = Path(out), real(out)
    inputs = [*model_folders(cfg), *_data_files(cfg)] + ([("--config", cfg.source)] if cfg.source else [])
    for key, path in inputs:
        if _relation(resolved, real(path)) in ("is", "lies inside"):
            raise UserError(f"--out {out}: is or lies inside {key} ({path!r}), which the run reads")
    if target.is_dir():
        raise UserError(f"--out {out}: is a folder; give the path of a JSON file")
    if target.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it, or choose another file")
    return target
