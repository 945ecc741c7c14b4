"""Two gloo ranks x batch 2 make the update of one process x batch 4: the multi-process guarantees, one launch
per loss path, each launch checking several properties at once (a launch costs far more than a check).

- plain: an online teacher, the plain loss path; the token count of the whole step is gathered over ranks and
  DDP averages gradients, so the loss does not depend on how a step is split;
- fused: a self-teacher and a stored teacher whose store is missing (kd_white_box): rank 0 scores it while
  rank 1 waits for the complete store; then the fused chunked loss (the student's hidden states come out of the
  DDP-wrapped forward, so gradient sync sees the fused backward) with two teachers and jsd. The store holds every
  probability (k = vocabulary width), so the run equals the online teacher in one process.
"""

from __future__ import annotations

import json

import pytest
from kd_helpers import kd_config, load_adapter_weights, max_abs_diff, train, train_on_two_ranks, write_records

from easydistill.store.topk import TopKLogitsStore

SGD = {
    "optim": "sgd",
    "learning_rate": 1.0,
    "max_grad_norm": 0.0,
    "lr_scheduler_type": "constant",
    "max_steps": 1,
}


def configs(case: str, tiny_pair, data, tmp_path) -> tuple[dict, dict]:
    """(one process x batch 4, two ranks x batch 2) for a case."""
    teacher = str(tiny_pair[0])
    if case == "plain":
        common: dict = {}
        one_teachers = two_teachers = None
    else:
        common = {"distillation": {"chunk_size": 5, "distillation_type": "jsd"}}
        one_teachers = {"teacher": [{"path": "self"}, {"path": teacher}]}
        two_teachers = {
            "teacher": [{"path": "self"}, {"path": teacher, "logits_path": str(tmp_path / "logits")}]
        }
    one = kd_config(
        tiny_pair, data, tmp_path / "one", training={**SGD, "per_device_train_batch_size": 4}, **common
    )
    two = kd_config(
        tiny_pair, data, tmp_path / "two", training={**SGD, "per_device_train_batch_size": 2}, **common
    )
    if case == "fused":
        one["models"].update(one_teachers)
        two["models"].update(two_teachers)
        two["job_type"] = "kd_white_box"  # the missing store is computed before training
        two["inference"] = {"top_logits_num": 100_000}
    return one, two


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["plain", "fused"])
def test_two_ranks_equal_one_process(case, tiny_pair, tmp_path):
    data = write_records(tmp_path / "train.jsonl", n=12)
    one, two = configs(case, tiny_pair, data, tmp_path)
    train(one)
    proc = train_on_two_ranks(two, tmp_path / "two.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "trainer_state.json").read_text())["global_step"] == 1
    if case == "fused":
        assert TopKLogitsStore(tmp_path / "logits").count("train") == 12
    first, both = load_adapter_weights(tmp_path / "one"), load_adapter_weights(tmp_path / "two")
    assert max(float(v.abs().max()) for k, v in first.items() if "lora_B" in k) > 1e-3  # the step moved
    assert max_abs_diff(first, both) < (1e-5 if case == "plain" else 1e-4)  # the store is fp16 on disk
