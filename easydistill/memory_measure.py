"""Peak memory of a few real KD training steps on the CPU, to hold a memory plan (memory_plan.py) against.

    python -m easydistill.plan --config x.json --measure 3

`measure` runs the steps in a fresh process (`measure_here`), so that nothing of the caller's allocations
counts, and returns the peaks it saw; docs/memory.md compares them with the plan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def measure_here(config_path: str, steps: int) -> None:
    """In a fresh process: prepare the run, then train `steps` steps under the profiler; print JSON."""
    import resource

    import torch
    from torch.profiler import ProfilerActivity, profile

    from easydistill.config import load_config
    from easydistill.train.trainer import prepare_run

    torch.set_num_threads(1)
    raw = json.loads(Path(config_path).read_text())
    raw["training"].update(max_steps=steps, save_strategy="no", disable_tqdm=True, report_to="none")
    raw["training"].pop("eval_strategy", None)
    kd = prepare_run(load_config(raw))
    models = [kd.trainer.model] + [t.model for t in kd.trainer.teachers if hasattr(t, "model")]
    storages = {}
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor = getattr(tensor, "ds_tensor", tensor)  # ZeRO-3 keeps this rank's partition there
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    live = sum(storages.values())
    rss_before = rss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kd.trainer.train()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = top = 0
    for _, nbytes in events:
        running += nbytes
        top = max(top, running)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "tensor_peak_bytes": live + top,
                "weights_and_buffers_bytes": live,
                "rss_before_train_bytes": rss_before,
                "peak_rss_bytes": peak_rss,
                "rank": int(os.environ.get("RANK", "0")),
            }
        )
    )


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config_path: str | Path, steps: int = 3) -> dict:
    """Peak memory of `steps` real training steps on the CPU, measured in a fresh process.

    tensor_peak_bytes: the weights and buffers alive when training starts plus the highest running sum of the
    CPU allocator's events recorded by torch.profiler (profile_memory) during train(): the CPU counterpart of
    torch.cuda.max_memory_allocated. peak_rss_bytes: the process's ru_maxrss, for comparison (it also holds
    the interpreter, libraries, the tokenizer and memory the C allocator keeps after frees).
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = f"from easydistill.memory_measure import measure_here; measure_here({str(config_path)!r}, {int(steps)})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
