"""EasyDistill v1 files as their users have them: what they meant, said back in our terms.

Each rule takes a v1 spelling and either runs it with v1's meaning (a note says so), or refuses it with the
keys to change. docs/migration.md lists them key by key. Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Any

# v1 job families easydistill does not run, with why. Checked before the schema, so that a v1 user reads the
# reason instead of a did-you-mean towards a KD job that does something else.
UNSUPPORTED_JOBS = (
    (
        ("mmkd_", "mmcot_"),
        "multimodal distillation is not supported: easydistill distils text-only causal language models",
    ),
    (
        ("cot_", "instruction_", "instruct_"),
        "EasyDistill v1's data synthesis and evaluation jobs (an API or vLLM writing or judging data) are not "
        "part of easydistill; make the data with v1 and train on it with kd_black_box_train_only",
    ),
    (("rank_", "rl_"), "preference and reinforcement learning jobs are not supported"),
    (("agentkd_",), "agent distillation jobs are not supported"),
    (("speckd_",), "speculative-decoding distillation is not supported"),
)

# inference keys only EasyDistill v1's kd_black_box_api read: an OpenAI-compatible endpoint.
API_KEYS = ("base_url", "api_key", "stream")


def unsupported_job(job: Any) -> str | None:
    """One problem line for a v1 job type easydistill does not run, else None."""
    if not isinstance(job, str):
        return None
    for prefixes, reason in UNSUPPORTED_JOBS:
        if job.startswith(prefixes):
            return f"$.job_type: {job!r} is an EasyDistill v1 job: {reason} (see docs/migration.md)"
    return None


def v1_rules(data: dict[str, Any], raw: dict[str, Any], warnings: list[str]) -> list[str]:
    """Every rule below, on a schema-valid config with defaults filled (`raw`: what the file said)."""
    problems = api_job_rules(data, raw, warnings)
    loss_rules(data, raw, warnings)
    if raw.get("inference", {}).get("trust_remote_code") and "trust_remote_code" not in raw.get("models", {}):
        warnings.append(
            "$.inference.trust_remote_code: not read (v1 passed it to vLLM); models.trust_remote_code decides "
            "whether code from the model folders runs, and it is off"
        )
    return problems


def api_job_rules(data: dict[str, Any], raw: dict[str, Any], warnings: list[str]) -> list[str]:
    """kd_black_box_api: with existing answers, train on them; with prompts only, refuse naming the keys."""
    job, dataset = data["job_type"], data["dataset"]
    given = [k for k in API_KEYS if k in raw.get("inference", {})]
    unused = ", ".join(f"inference.{k}" for k in given)
    if job != "kd_black_box_api":
        if given:
            warnings.append(f"{unused}: unused (only EasyDistill v1's kd_black_box_api called an API)")
        return []
    if not dataset.get("labeled_path"):
        return [
            "$.job_type: kd_black_box_api asks a remote API to answer dataset.instruction_path, which easydistill "
            'does not do. To have a local model answer, set job_type to "kd_black_box_local" and models.teacher '
            "to its folder; or put the answers you have in a file named by dataset.labeled_path"
        ]
    given += ["system_prompt"] if "system_prompt" in raw.get("inference", {}) else []  # nothing is generated
    unused = ", ".join(f"inference.{k}" for k in given)
    warnings.append(
        "$.job_type: kd_black_box_api trains on the answers already in dataset.labeled_path (as "
        "kd_black_box_train_only): easydistill calls no API"
        + (f", so {unused} {'is' if len(given) == 1 else 'are'} unused" if given else "")
    )
    return []


def loss_rules(data: dict[str, Any], raw: dict[str, Any], warnings: list[str]) -> None:
    """v1's sum over several teachers, and knobs that the chosen divergence does not read."""
    distill, said = data["distillation"], raw.get("distillation", {})
    teacher, logits = data["models"].get("teacher"), data["dataset"].get("logits_path")
    folders = isinstance(teacher, list) and len(teacher) > 1 and all(isinstance(t, str) for t in teacher)
    if "combine" not in said and data["job_type"].startswith("kd_white_box"):
        if isinstance(logits, list) and len(logits) > 1:
            # v1's only multi-teacher form: its trainer summed the KD losses of the listed logits files.
            distill["combine"] = "sum"
            warnings.append(
                f"$.distillation.combine: the {len(logits)} teachers of dataset.logits_path are summed as in "
                'EasyDistill v1 ("sum"); set distillation.combine to "weighted_loss" to weight them instead'
            )
        elif folders:
            warnings.append(
                f"$.distillation.combine: the {len(teacher)} teachers each weigh 1/{len(teacher)} "
                '("weighted_loss"); EasyDistill v1 summed its teachers\' KD losses: set distillation.combine '
                'to "sum" for that'
            )
    kind = distill["distillation_type"]
    if "beta" in said and kind != "jsd":
        warnings.append(
            f'$.distillation.beta: read only by distillation_type "jsd"; this run trains {kind}'
            + ("" if "distillation_type" in said else " (the default)")
            + '. For the GKD / TRL / ms-swift meaning of beta set distillation_type to "jsd" '
            "(beta 0 = forward KL, 1 = reverse KL)"
        )
    if "skew_alpha" in said and not kind.startswith("skew_"):
        warnings.append(
            f"$.distillation.skew_alpha: read only by skew_forward_kld and skew_reverse_kld; this run trains {kind}"
        )
