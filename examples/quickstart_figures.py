"""The quickstart's figures: each model on the held-out records (teacher-forced CE, KL to the teacher, top-1
agreement, exact match against the synthetic task's right answers), their table, and KD against CE-only."""

from __future__ import annotations

from pathlib import Path

from examples import synthetic

COLUMNS = (
    ("ce", "CE/token"),
    ("kl", "KL(T||S)/token"),
    ("top1_agreement", "top-1 agree"),
    ("exact_match", "exact match"),
)
ROW_NAMES = {
    "teacher": "teacher (reference)",
    "student_before": "student before",
    "student_kd": "student after KD",
    "student_ce_only": "student after CE-only",
}


def measure(model_dir: Path, teacher, tokenizer, batches, heldout, template) -> dict:
    from transformers import AutoModelForCausalLM

    from easydistill.evaluation.exact_match import exact_match_rate
    from easydistill.evaluation.metrics import teacher_forced_metrics

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    row = teacher_forced_metrics(model, teacher, batches)
    row["exact_match"] = exact_match_rate(
        model, tokenizer, heldout, template, reference=synthetic.reference()
    )
    return row


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'held-out':24s}" + "".join(f"{title:>16s}" for _, title in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        # CE and KL span 1e-4..6 between an untrained and a converged model: significant digits, not decimals.
        cells = [f"{row[key]:16.4g}" if key in ("ce", "kl") else f"{row[key]:16.4f}" for key, _ in COLUMNS]
        lines.append(f"{ROW_NAMES[name]:24s}" + "".join(cells))
    return "\n".join(lines)


KL_TOLERANCE = 0.05  # relative; paired KD and CE-only runs of one seed differed by up to 4% in our sweeps


def compare(kd: dict, ce: dict, n_heldout: int) -> dict:
    """KD vs CE-only at equal steps: held-out KL (lower is better) and exact match (higher is better)."""
    if kd["kl"] < ce["kl"] * (1 - KL_TOLERANCE):
        kl_verdict = "KD lower"
    elif ce["kl"] < kd["kl"] * (1 - KL_TOLERANCE):
        kl_verdict = "CE-only lower"
    else:
        kl_verdict = f"tie (within {KL_TOLERANCE:.0%})"
    records = round((kd["exact_match"] - ce["exact_match"]) * n_heldout)
    if records:
        em_verdict = (
            f"{'KD' if records > 0 else 'CE-only'} right on {abs(records)} more of {n_heldout} records"
        )
    else:
        em_verdict = "tie"
    return {
        "kl": {"kd": kd["kl"], "ce_only": ce["kl"], "verdict": kl_verdict},
        "exact_match": {"kd": kd["exact_match"], "ce_only": ce["exact_match"], "verdict": em_verdict},
        "kd_beats_ce_only": kl_verdict == "KD lower" and records > 0,
    }
