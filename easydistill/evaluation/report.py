"""The run report: held-out figures before and after training (and at each Trainer evaluation), loss curves.

run_training attaches a `RunReport` when the config has an eval split and `evaluation.report` is on (default):

    before training   the student on the eval split: CE, perplexity, accuracy, KL / JSD / top-1 agreement to
                      each teacher, exact match (greedy answers vs the records' outputs); the teachers'
                      own figures once
    on_evaluate       whenever Trainer evaluates (eval_strategy "steps" with eval_steps, or "epoch"): the same
                      teacher-forced figures without generation
    after training    the student again, with exact match

and writes into output_dir: report.json (everything, machine-readable), report.md (tables) and loss_curves.png
(train CE and KD per logging step, held-out KL per evaluation). On several processes every rank computes the
figures (the models are replicated) and the first writes; sharded models (FSDP, DeepSpeed) are not supported
here, the report is skipped with a note.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

REPORT_FILES = ("report.json", "report.md", "loss_curves.png")


def attach_report(run, log=print, reference=None) -> RunReport | None:
    """A RunReport registered on the run's trainer, or None when the config asks for none or cannot have one.

    reference: an optional `exact_match.Reference` plug-in (a task that knows its right answers)."""
    from easydistill.evaluation.heldout import has_eval_split, settings

    if not settings(run.cfg).report or not has_eval_split(run.cfg) or not run.eval_examples:
        return None
    trainer = run.trainer
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        log(
            "note: evaluation.report: skipped with FSDP / DeepSpeed (sharded weights); run easydistill.eval after"
        )
        return None
    report = RunReport(run, batch_size=trainer.args.per_device_eval_batch_size, reference=reference)
    trainer.add_callback(report)
    return report


class RunReport(TrainerCallback):
    """Evaluations of the student during one run, and the files that describe them."""

    def __init__(self, run, *, batch_size: int, reference=None):
        from easydistill.evaluation import exact_match
        from easydistill.evaluation.heldout import eval_records, settings, with_eval_rows

        self.cfg, self.tokenizer = run.cfg, run.tokenizer
        self.trainer = run.trainer
        self.options = settings(run.cfg)
        self.examples = run.eval_examples[: self.options.max_samples or None]
        self.exact_match, self.exact_match_basis = exact_match.plan(
            eval_records(run.cfg, self.examples), self.options.exact_match, reference
        )
        self.batch_size = batch_size
        self.teacher_objects = with_eval_rows(run.trainer.teachers)
        self.evaluations: list[dict] = []
        self.teachers: dict = {}
        self.seconds = 0.0

    def evaluate(self, label: str, *, generate: bool) -> dict:
        """Figures of the student now; the teachers' own figures the first time only."""
        import time

        started = time.perf_counter()
        from easydistill.evaluation.heldout import evaluate_models

        trainer = self.trainer
        got = evaluate_models(
            trainer.accelerator.unwrap_model(trainer.model),
            self.tokenizer,
            self.teacher_objects,
            self.examples,
            self.exact_match,
            template=self.cfg.dataset.template,
            batch_size=self.batch_size,
            max_new_tokens=self.options.max_new_tokens,
            teachers_too=not self.teachers,
            generate=generate,
        )
        if not self.teachers:
            self.teachers = got["teachers"]
        entry = {"label": label, "step": trainer.state.global_step, **got["student"]}
        entry["n_tokens"] = got["n_tokens"]
        self.evaluations.append(entry)
        self.seconds += time.perf_counter() - started
        return entry

    def before(self) -> None:
        self.evaluate("before training", generate=True)

    def on_evaluate(self, args, state, control, **kwargs):
        last = self.evaluations[-1] if self.evaluations else None
        if last is not None and last["step"] == state.global_step and last["label"] != "before training":
            return  # the same weights evaluated again (Trainer's last-step evaluation, then run_training's)
        self.evaluate(f"step {state.global_step}", generate=False)

    def after(self) -> dict:
        """The final evaluation; an on_evaluate figure at the same step is completed with exact match only."""
        last = self.evaluations[-1] if self.evaluations else None
        step = self.trainer.state.global_step
        if last is not None and last["step"] == step and last["label"] != "before training":
            if self.exact_match is not None:
                last["exact_match"] = self.exact_match.rate(
                    self.trainer.accelerator.unwrap_model(self.trainer.model),
                    self.tokenizer,
                    self.cfg.dataset.template,
                    max_new_tokens=self.options.max_new_tokens,
                    batch_size=self.batch_size,
                )
            last["label"] = "after training"
            return last
        return self.evaluate("after training", generate=True)

    def write(self, metrics: dict) -> dict:
        """report.json, report.md and loss_curves.png into output_dir; returns the report."""
        report = build_report(
            self.cfg, self.trainer.state.log_history, self.evaluations, self.teachers, metrics
        )
        report["exact_match_basis"] = self.exact_match_basis
        report["evaluation_seconds"] = round(self.seconds, 2)
        write_report(report, self.cfg.output_dir)
        return report


# ---------------------------------------------------------------- the files


def curves(log_history: list[dict], evaluations: list[dict]) -> dict[str, list[list[float]]]:
    """Named series of [step, value]: train ce/kd/loss per log, eval_loss, held-out KL per teacher."""
    series: dict[str, list[list[float]]] = {}
    for entry in log_history:
        for key in ("loss", "ce_loss", "kd_loss", "eval_loss"):
            if key in entry and "step" in entry and isinstance(entry[key], (int, float)):
                series.setdefault(key, []).append([entry["step"], float(entry[key])])
    for entry in evaluations:
        for name, versus in entry.get("vs", {}).items():
            series.setdefault(f"heldout_kl/{name}", []).append([entry["step"], versus["kl"]])
        series.setdefault("heldout_ce", []).append([entry["step"], entry["ce"]])
    return series


def build_report(cfg, log_history, evaluations, teachers, metrics) -> dict:
    return {
        "config": cfg.source,
        "output_dir": str(cfg.output_dir),
        "job_type": cfg.job_type,
        "student": cfg.models.student,
        "teachers": [{"name": t.name, "kind": t.kind, "weight": t.weight} for t in cfg.teachers],
        "objective": {"kd_ratio": cfg.loss.kd_ratio, "kind": cfg.loss.kind},
        "evaluations": evaluations,
        "teacher_figures": teachers,
        "curves": curves(log_history, evaluations),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
    }


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    lines = [
        f"# Run report: {report['output_dir']}",
        "",
        f"Config `{report['config'] or '(built in code)'}`, job `{report['job_type']}`, student `{report['student']}`, "
        f"objective (1 − {report['objective']['kd_ratio']:g})·CE + {report['objective']['kd_ratio']:g}·"
        f"{report['objective']['kind']}.",
        "",
        "## Held-out figures of the student (per response token)",
        "",
    ]
    teachers = list(report["teacher_figures"])
    head = ["when", "step", "CE", "perplexity", "accuracy", "exact match"]
    for name in teachers:
        head += [f"KL({name}‖S)", f"JSD {name}", f"agree {name}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in report["evaluations"]:
        cells = [e["label"], e["step"], e["ce"], e["perplexity"], e["accuracy"], e.get("exact_match")]
        for name in teachers:
            v = e["vs"].get(name, {})
            cells += [v.get("kl"), v.get("jsd"), v.get("top1_agreement")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if teachers:
        lines += ["", "## The teachers on the same examples", ""]
        lines += [
            "| teacher | kind | CE | perplexity | accuracy | exact match |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in report["teacher_figures"].items():
            cells = [name, t["kind"], t["ce"], t["perplexity"], t["accuracy"], t.get("exact_match")]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        f"Exact match: {report.get('exact_match_basis', '–')}. "
        f"Evaluation time: {report.get('evaluation_seconds', 0):.1f} s.",
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)" if report.get("plot") else f"(no plot: {report.get('plot_note')})",
        "",
    ]
    return "\n".join(lines)


LEGEND = {
    "ce_loss": "train CE (on the labels)",
    "kd_loss": "train KD divergence",
    "eval_loss": "eval loss (the training objective)",
    "heldout_ce": "held-out CE",
}


def plot(series: dict[str, list[list[float]]], path: Path) -> str | None:
    """loss_curves.png: train CE / KD per log, eval loss and held-out KL per evaluation; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    shown = {k: v for k, v in series.items() if k != "loss" and v}
    if not shown:
        return "nothing was logged"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in shown.items():
        steps, values = zip(*points)
        style = "o--" if name.startswith(("heldout", "eval")) else "-"  # measured at a few steps only
        ax.plot(
            steps,
            values,
            style,
            label=LEGEND.get(name, name.replace("heldout_kl/", "held-out KL ")),
            markersize=4,
        )
    positive = all(v > 0 for points in shown.values() for _, v in points)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write_report(report: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    note = plot(report["curves"], out_dir / "loss_curves.png")
    report["plot"] = None if note else "loss_curves.png"
    report["plot_note"] = note
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
