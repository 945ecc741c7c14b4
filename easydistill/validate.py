"""Check a config without loading weights: schema, cross-field rules and preflight, every problem at once.

    python -m easydistill.validate --config configs/kd_white_box.json

Exit code 0 with a summary of the resolved run, or 2 with one line per problem naming its JSON path.
"""

from __future__ import annotations

import easydistill.own_package  # noqa: F401  (first: refuses a shadowed package)
from easydistill.cli import config_parser, load_and_check, run


def _teacher_lines(cfg) -> list[str]:
    from easydistill.store.answer_files import answering_teacher, answers_path, key_file, writes_answers

    summed = cfg.loss.combine == "sum"
    lines = []
    for t in cfg.teachers:
        where = {"self": "student base weights, LoRA disabled", "online": t.path, "cached": t.logits_path}[
            t.kind
        ]
        weight = "summed" if summed else f"weight {t.weight:.3g}"
        lines.append(f"  teacher:    {t.name} [{t.kind}] {where} ({weight}, T={t.temperature:g})")
    target = answers_path(cfg)
    if writes_answers(cfg) and not (target.is_file() and not key_file(target).is_file()):
        state = "reused" if target.is_file() else f"{answering_teacher(cfg)} writes them first"
        lines.append(f"  answers:    {target} ({state}, from {cfg.dataset.instruction_path})")
        if not cfg.teachers:
            lines.append(f"  teacher:    {answering_teacher(cfg)} (its answers only: black box)")
    elif not cfg.teachers:
        lines.append(f"  teacher:    {cfg.teacher_mode}")
    return lines + _store_lines(cfg)


def _store_lines(cfg) -> list[str]:
    cached = [t for t in cfg.teachers if t.kind == "cached"]
    if not cached:
        return []
    from easydistill.store.topk import is_complete, store_location  # numpy

    lines = []
    for t in cached:
        store, v1_file = store_location(cfg, t)
        if is_complete(store):
            state = "complete"
        elif v1_file is not None:
            state = f"converted first from the EasyDistill v1 file {v1_file}"
        else:
            state = f"written first by {t.path}"
        lines.append(f"  logits:     {t.name}: store {store} ({state})")
    return lines


def summary(cfg, report) -> str:
    loss, lora = cfg.loss, cfg.lora
    lines = [f"ok: {cfg.source}", f"  job:        {cfg.job_type}", f"  student:    {cfg.models.student}"]
    lines += _teacher_lines(cfg)
    if cfg.is_white_box:
        extra = f", beta={loss.beta:g}" if loss.kind == "jsd" else ""
        several = f" ({loss.combine} over {len(cfg.teachers)} teachers)" if len(cfg.teachers) > 1 else ""
        lines.append(
            f"  loss:       (1 - {loss.kd_ratio:g})*CE + {loss.kd_ratio:g}*{loss.kind}(T={loss.temperature:g}{extra})"
            + several
        )
    else:
        lines.append("  loss:       CE on the labeled answers")
    if lora.enable:
        lines.append(
            f"  lora:       r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on "
            f"{', '.join(report.lora_targets)}" + (" (+ merged model)" if lora.save_merged_model else "")
        )
    else:
        lines.append("  lora:       off (all student weights train)")
    lines.append(
        f"  data:       {cfg.dataset.labeled_path or cfg.dataset.instruction_path} "
        f"(max {cfg.max_length} tokens)"
    )
    if report.template_preview:
        lines.append(f"  template:   {cfg.dataset.template}: {report.template_preview[0]}")
        lines += [f"              {line}" for line in report.template_preview[1:]]
    lines.append(f"  output_dir: {cfg.output_dir}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = config_parser("python -m easydistill.validate", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg, report = load_and_check(args.config)
    print(summary(cfg, report))
    return 0


if __name__ == "__main__":
    run(main)
