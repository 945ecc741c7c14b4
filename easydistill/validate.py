"""Check a config without loading weights: schema, cross-field rules and preflight, every problem at once.

    python -m easydistill.validate --config configs/kd_white_box.json

Exit code 0 with a summary of the resolved run, or 2 with one line per problem naming its JSON path.
"""

from __future__ import annotations

from easydistill.cli import config_parser, load_and_check, run


def summary(cfg, report) -> str:
    loss, lora = cfg.loss, cfg.lora
    lines = [f"ok: {cfg.source}", f"  job:        {cfg.job_type}", f"  student:    {cfg.models.student}"]
    for t in cfg.teachers:
        where = {"self": "student base weights, LoRA disabled", "online": t.path, "cached": t.logits_path}[
            t.kind
        ]
        lines.append(
            f"  teacher:    {t.name} [{t.kind}] {where} (weight {t.weight:.3g}, T={t.temperature:g})"
        )
    if not cfg.teachers:
        lines.append(f"  teacher:    {cfg.teacher_mode}")
    if cfg.is_white_box:
        extra = f", beta={loss.beta:g}" if loss.kind == "jsd" else ""
        lines.append(
            f"  loss:       (1 - {loss.kd_ratio:g})*CE + {loss.kd_ratio:g}*{loss.kind}(T={loss.temperature:g}{extra})"
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
