"""The memory plan per device under an engine: what DDP, ZeRO-2, ZeRO-3 and FSDP2 (± CPU offload) leave on
each of W devices, from the one-device plan of memory_plan.py.

    weights      DDP, ZeRO-2: whole on every device; ZeRO-3, FSDP2: 1/W, plus the parameters gathered while
                 they are used (two decoder layers: the one computing and the one prefetched); offloaded
                 parameters live in CPU memory and only the gathered ones visit the device
    gradients    DDP: whole; ZeRO-2, ZeRO-3, FSDP2: 1/W (reduce-scattered)
    optimizer    DDP: whole; ZeRO-2, ZeRO-3, FSDP2: 1/W; DeepSpeed keeps an fp32 master copy of its partition
                 besides fp32 Adam moments (12 bytes per trainable parameter); offloaded: in CPU memory
    teachers     sharded (ZeRO-3, FSDP2, placement auto/sharded): 1/W + its two gathered layers during its
                 forward; replicated: whole; offload: visiting for its forward; a self-teacher is the student
    loss         unchanged per device (each rank has its own micro-batch), plus each head gathered whole
                 once per step under ZeRO-3 / FSDP2 (train/gather.py)
    activations  unchanged (per micro-batch)

The peak keeps memory_plan's three moments (loss forward, backward start, optimizer step) with these shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from easydistill.memory_plan import MIB, Arch, Plan, Term

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


@dataclass
class EngineSpec:
    name: str = "ddp"  # one of ENGINES
    devices: int = 1
    offload_params: bool = False  # ZeRO-3 offload_param / FSDP2 offload_params
    offload_optimizer: bool = False  # DeepSpeed offload_optimizer (FSDP2 offloads both together)
    teacher_placement: str = "auto"

    @property
    def shards_weights(self) -> bool:
        return self.name in ("zero3", "fsdp2")

    @property
    def shards_states(self) -> bool:
        return self.name != "ddp"

    @classmethod
    def from_deepspeed_file(cls, path: str, devices: int) -> EngineSpec:
        """Stage and offload read from a DeepSpeed JSON config (training.deepspeed)."""
        import json
        from pathlib import Path

        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))

        def offloaded(key: str) -> bool:
            return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

        name = "zero3" if stage == 3 else "zero2" if stage >= 1 else "ddp"
        return cls(name, devices, offloaded("offload_param"), offloaded("offload_optimizer"))


def _layer_bytes(arch: Arch, dtype_bytes: int) -> int:
    """One decoder layer's parameters (what ZeRO-3 / FSDP2 gather for it): all but embeddings and head."""
    outside = arch.vocab * arch.hidden * 2  # input embeddings and an untied head (tied: an upper bound)
    return max(arch.params - outside, 0) // max(arch.layers, 1) * dtype_bytes


@dataclass
class DevicePlan:
    spec: EngineSpec
    terms: list[Term]
    moments: dict[str, int]
    peak: int
    cpu_bytes: int  # offloaded weights and optimizer states, in each rank's CPU memory

    def table(self) -> str:
        s = self.spec
        offload = [k for k, v in (("params", s.offload_params), ("optimizer", s.offload_optimizer)) if v]
        title = f"per device: {s.name} on {s.devices} devices" + (
            f", offload {'+'.join(offload)}" if offload else ""
        )
        lines = [title, f"{'owner':16s}{'term':44s}{'MiB':>12s}  formula", "-" * 100]
        for t in self.terms:
            lines.append(f"{t.owner[:15]:16s}{t.what[:43]:44s}{t.mib:12.1f}  {t.how}")
        lines.append("-" * 100)
        for name, value in self.moments.items():
            lines.append(f"{'moment':16s}{name:44s}{value / MIB:12.1f}")
        lines.append(f"{'PEAK per device':60s}{self.peak / MIB:12.1f}")
        if self.cpu_bytes:
            lines.append(f"{'CPU memory per rank (offloaded)':60s}{self.cpu_bytes / MIB:12.1f}")
        return "\n".join(lines)


def per_device(plan: Plan, spec: EngineSpec, student: Arch, teachers: dict[str, Arch]) -> DevicePlan:
    """One device's plan under `spec`. `teachers`: online teachers' name -> Arch."""
    w = max(spec.devices, 1)
    weights_split = spec.shards_weights
    zero = spec.name.startswith("zero")
    off_optimizer = (spec.offload_optimizer and zero) or (spec.offload_params and spec.name == "fsdp2")
    teacher_sharded = weights_split and spec.teacher_placement in ("auto", "sharded")
    terms: list[Term] = []
    cpu = static1 = optimizer1 = 0
    static = optimizer = grads = activations = teacher_forward = 0
    loss = []
    b_s = 2 if student.dtype in ("bfloat16", "float16") else 4
    for t in plan.terms:
        owner, what, size, how = t.owner, t.what, t.bytes, t.how
        resident = what.startswith(("weights", "LoRA")) and "offload" not in what
        static1 += size if resident else 0
        if owner == "student" and resident:
            if student.params and what.startswith("weights"):
                b_s = size // student.params
            if weights_split:
                size, how = size // w, f"{how} / {w}"
            if weights_split and spec.offload_params:
                cpu, size, what = cpu + size, 0, f"{what}, offloaded"
            static += size
        elif owner == "student" and what == "gradients":
            if spec.shards_states:
                size, how = size // w, f"{how} / {w}"
            grads = size
        elif owner == "student" and what.startswith("optimizer"):
            optimizer1 = size
            if zero:  # an fp32 master copy of the partition besides the fp32 moments, whatever the dtype
                trainable = int(how.split(" x ")[1].replace(",", ""))
                size, what, how = 12 * trainable, "optimizer (fp32 master, m, v)", f"12 x {trainable:,}"
            if spec.shards_states:
                size, how = size // w, f"{how} / {w}"
            if off_optimizer:
                cpu, size, what = cpu + size, 0, f"{what}, offloaded"
            optimizer = size
        elif owner == "student" and what.startswith("activations"):
            activations = size
        elif owner in teachers and resident:
            if teacher_sharded:
                size, how, what = size // w, f"{how} / {w}", f"{what}, sharded"
                if spec.offload_params:
                    cpu, size, what = cpu + size, 0, f"{what}, offloaded"
            static += size
        elif owner in teachers and what.startswith("forward"):
            arch = teachers[owner]
            visiting = 2 * _layer_bytes(arch, b_s) if teacher_sharded else 0
            teacher_forward = max(teacher_forward, size + visiting)
        elif owner in teachers:  # offloaded teacher: whole, on the device for its forward
            teacher_forward = max(teacher_forward, size)
        elif owner == "loss":
            loss.append(size)
        terms.append(Term(owner, what, size, how))
    if weights_split:
        gathered = 2 * _layer_bytes(student, b_s)
        terms.append(
            Term("student", "gathered: computing + prefetched layer", gathered, "2 x layer params x dtype")
        )
        heads = student.vocab * student.hidden * b_s + sum(
            a.vocab * a.hidden * b_s for a in teachers.values()
        )
        terms.append(Term("loss", "heads gathered once per step", heads, "sum of V x H x dtype"))
        static += gathered
        loss.append(heads)
    backward_key = next(k for k in plan.moments if k.startswith("backward"))
    backward = plan.moments[backward_key] - static1 - optimizer1  # activations + saved + in flight
    moments = {
        "loss forward: activations + loss tensors": activations + max(sum(loss), teacher_forward),
        backward_key: backward,
        "optimizer step: all gradients": grads,
    }
    peak = static + optimizer + max(moments.values())
    moments = {k: static + optimizer + v for k, v in moments.items()}
    return DevicePlan(spec, terms, moments, peak, cpu)


# ---------------------------------------------------------------- measuring under the engine (CPU, gloo)

LAUNCH_FLAGS = {
    "ddp": [],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3"],
}


def measure_on_ranks(config_path, steps: int, spec: EngineSpec) -> dict:
    """Train `steps` steps under `spec` on `spec.devices` CPU processes (gloo; DeepSpeed on its CPU
    accelerator) and measure each rank as memory_plan.measure does; the largest rank's figures, and all.

    engine_peak_bytes, the figure compared with the plan: the rank's weights and buffers when training starts
    plus its resident-memory growth during train(). The profiler's allocator events (tensor_peak_bytes) do
    not pair up under DeepSpeed (it swaps parameters' storages for partitions and flat buffers): their
    running sum exceeds the process's own peak RSS, so it is kept for reference only."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from easydistill.errors import UserError

    if spec.name not in LAUNCH_FLAGS:
        raise UserError(f"--measure: {spec.name} cannot run on this host's CPU processes (FSDP needs GPUs)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH_FLAGS[spec.name]]
    command += ["--num_processes", str(spec.devices), "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    command += ["-m", "easydistill.memory_sharding", str(config_path), str(int(steps))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"tensor_peak_bytes"')]
    if done.returncode != 0 or len(ranks) != spec.devices:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    for r in ranks:
        r["engine_peak_bytes"] = (
            r["weights_and_buffers_bytes"] + r["peak_rss_bytes"] - r["rss_before_train_bytes"]
        )
    top = max(ranks, key=lambda r: r["engine_peak_bytes"])
    return {**top, "ranks": sorted(ranks, key=lambda r: r["rank"])}


if __name__ == "__main__":  # one rank of measure_on_ranks
    import sys

    from easydistill.memory_measure import measure_here

    measure_here(sys.argv[1], int(sys.argv[2]))
