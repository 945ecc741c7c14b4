"""Which multi-device engine is in force, where the student and each teacher live, and what a KD step needs
from the engine: a head gathered once per step, teachers placed on purpose.

The engines are accelerate's (DDP, FSDP2) and DeepSpeed's (ZeRO-2/3), never our own. What was asked for
(`accelerate launch --use_deepspeed / --use_fsdp`, `training.deepspeed`, `training.fsdp`, the launcher's
WORLD_SIZE) is compared with what the built Trainer runs; a difference is a user error (exit 2), never a
silent fallback to DDP. The run prints one start line, e.g.

    engine: zero3 on 2 ranks; student sharded; teacher 'teacher' sharded (DeepSpeed, inference only);
    optimizer sharded

and writes the same facts to `<output_dir>/engine.json` (and the engine's name to metrics.json).

Teacher placement (`models.teacher_placement`):
- auto: sharded when the student is (ZeRO-3, FSDP2), else a replica on every rank;
- sharded: ZeRO-3 loads it partitioned (zero.Init) and initialises it with DeepSpeed on the student's stage-3
  config without optimizer (each layer gathered for its forward); FSDP2 shards it with accelerate's FSDP2
  preparation; any other engine is an error;
- replicated: a full copy on every rank's device (loaded outside zero.Init);
- offload: a full copy in CPU memory, visiting the device for its forward (`models.teacher_offload`).
A self-teacher is the student's own weights: it is placed wherever the student is.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from easydistill.errors import UserError

# Tests only: accelerate enables FSDP on GPU-like devices alone; this switch turns it on for gloo on a CPU
# host so that the FSDP2 paths can be tested here. The product path never sets it.
TEST_FSDP_ON_CPU = "EASYDISTILL_TEST_FSDP_ON_CPU"
PLACEMENTS = ("auto", "sharded", "replicated", "offload")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass
class Requested:
    """What the launch and the config asked for."""

    deepspeed: bool
    fsdp: bool
    world_size: int  # the launcher's WORLD_SIZE (1 without a launcher)

    @classmethod
    def of(cls, args) -> Requested:
        deepspeed = bool(args.deepspeed) or _flag("ACCELERATE_USE_DEEPSPEED")
        fsdp = bool(getattr(args, "fsdp", None)) or _flag("ACCELERATE_USE_FSDP")
        return cls(deepspeed, fsdp, int(os.environ.get("WORLD_SIZE", "1")))


def _deepspeed_world_size() -> int | None:
    """Ranks DeepSpeed's own communicator sees, None when DeepSpeed is not initialised."""
    try:
        from deepspeed import comm
    except ImportError:
        return None
    return comm.get_world_size() if comm.is_initialized() else None


def check_launch(args) -> Requested:
    """Before any weight loads: make DeepSpeed share the Trainer's process group, and stop on what cannot work.

    zero.Init partitions the models while they load, with DeepSpeed's own view of the ranks: it must be the
    Trainer's (else batch-size checks fail, or both ranks train the same batch and both write the output).
    """
    asked = Requested.of(args)
    if asked.fsdp and asked.deepspeed:
        raise UserError("$.training: FSDP and DeepSpeed are both asked for; choose one engine")
    if asked.deepspeed:
        try:
            import deepspeed
        except ImportError:
            raise UserError(
                "$.training.deepspeed: DeepSpeed is asked for but not installed: pip install -e '.[deepspeed]'"
            ) from None
        if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    if args.world_size != asked.world_size:
        raise UserError(
            f"the launcher started {asked.world_size} processes but the Trainer sees {args.world_size} "
            f"(training.use_cpu={args.use_cpu}, no usable device for the launched backend?): the ranks would "
            "train the same batches and write the same output"
        )
    ds_ranks = _deepspeed_world_size()
    if asked.deepspeed and ds_ranks is not None and ds_ranks != args.world_size:
        raise UserError(
            f"DeepSpeed sees {ds_ranks} ranks but the Trainer sees {args.world_size} "
            f"(training.use_cpu={args.use_cpu}): both would train the same batch and write the same output"
        )
    no_fsdp_device = args.distributed_state.distributed_type.name in ("NO", "MULTI_CPU")
    if asked.fsdp and no_fsdp_device and not _flag(TEST_FSDP_ON_CPU):
        raise UserError(
            "FSDP is asked for (accelerate launch --use_fsdp, an accelerate config with distributed_type FSDP, "
            "or training.fsdp), but accelerate switches FSDP on only for GPU-like devices and this host has "
            "none: the run would silently be DDP. Use DeepSpeed ZeRO-3 on CPU hosts (configs/accelerate/)"
        )
    return asked


def force_fsdp_for_tests(trainer) -> None:
    """The test-only switch: turn accelerate's state to FSDP after it was built on a CPU host."""
    if not _flag(TEST_FSDP_ON_CPU) or not Requested.of(trainer.args).fsdp:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        plugin_args = trainer.args.fsdp_plugin_args or {}
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.fsdp_plugin = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


# ---------------------------------------------------------------- what is in force


@dataclass
class Engine:
    name: str  # single | ddp | zero1 | zero2 | zero3 | fsdp1 | fsdp2
    world_size: int
    student: str
    optimizer: str
    teachers: dict[str, str] = field(default_factory=dict)

    @property
    def zero3(self) -> bool:
        return self.name == "zero3"

    @property
    def fsdp2(self) -> bool:
        return self.name == "fsdp2"

    @property
    def shards_parameters(self) -> bool:
        return self.name in ("zero3", "fsdp1", "fsdp2")

    def line(self) -> str:
        teachers = "".join(f"; teacher {name!r} {where}" for name, where in self.teachers.items())
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"engine: {self.name} on {ranks}; student {self.student}{teachers}; optimizer {self.optimizer}"

    def as_dict(self) -> dict:
        return asdict(self)


def _deepspeed_config(trainer) -> dict:
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config


def _offloaded(zero: dict, key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")


def detect(trainer) -> Engine:
    """The engine the built Trainer runs, and where the student and its optimizer states live."""
    state = trainer.accelerator.state
    kind = state.distributed_type.name
    world = trainer.accelerator.num_processes
    if trainer.is_deepspeed_enabled:
        zero = _deepspeed_config(trainer).get("zero_optimization", {})
        stage = int(trainer.accelerator.state.deepspeed_plugin.zero_stage or 0)
        off_p, off_o = _offloaded(zero, "offload_param"), _offloaded(zero, "offload_optimizer")
        student = "sharded" if stage == 3 else "replicated"
        student += ", CPU-offloaded" if off_p and stage == 3 else ""
        optimizer = ("sharded" if stage >= 1 else "replicated") + (", CPU-offloaded" if off_o else "")
        return Engine(f"zero{stage}", world, student, optimizer)
    if kind == "FSDP":
        plugin = state.fsdp_plugin
        offload = bool(getattr(plugin, "cpu_offload", None)) and "offload_params=True" in repr(
            plugin.cpu_offload
        )
        where = "sharded" + (", CPU-offloaded" if offload else "")
        return Engine(f"fsdp{getattr(plugin, 'fsdp_version', 1)}", world, where, where)
    return Engine("single" if world == 1 else "ddp", world, "replicated", "replicated")


def check_in_force(asked: Requested, engine: Engine) -> None:
    """An engine asked for but not running is an error that says why."""
    if asked.deepspeed and not engine.name.startswith("zero"):
        raise UserError(f"DeepSpeed is asked for but the Trainer runs {engine.name}")
    if asked.fsdp and not engine.name.startswith("fsdp"):
        raise UserError(f"FSDP is asked for but the Trainer runs {engine.name}")
    if engine.world_size != asked.world_size:
        raise UserError(f"{asked.world_size} processes launched but the engine runs on {engine.world_size}")


# ---------------------------------------------------------------- teachers


def _teacher_deepspeed_config(trainer, model) -> dict:
    """The student's DeepSpeed config for an inference-only teacher: no optimizer, no scheduler, the bucket
    sizes DeepSpeed leaves "auto" set from the teacher's hidden size."""
    import copy

    config = copy.deepcopy(_deepspeed_config(trainer))
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(text, "hidden_size", None) or 1024
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    batch = trainer.args.per_device_train_batch_size
    accumulation = trainer.args.gradient_accumulation_steps
    config["train_micro_batch_size_per_gpu"] = batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = batch * accumulation * trainer.accelerator.num_processes
    for key in ("bf16", "fp16"):  # the teacher runs in its own dtype (models.teacher_dtype)
        config.pop(key, None)
    return config


def place_teachers(trainer, engine: Engine, cfg) -> None:
    """Place each online teacher as configured, and record where every teacher lives in `engine`."""
    placement = cfg.models.teacher_placement or "auto"
    for teacher in trainer.teachers:
        name = teacher.spec.name
        if teacher.spec.kind == "self":
            engine.teachers[name] = f"self (the student's weights, {engine.student})"
            continue
        if (
            teacher.spec.kind == "cross_tokenizer"
        ):  # its model reads its own tokens: not sharded with the student
            engine.teachers[name] = (
                "replicated (a teacher of another tokenizer; sharding it is not supported)"
            )
            continue
        if teacher.spec.kind != "online":
            engine.teachers[name] = "stored rows (no weights)"
            continue
        if getattr(teacher, "offload", False):
            engine.teachers[name] = "replicated in CPU memory (offload: on the device for its forward only)"
            continue
        want = "sharded" if placement == "auto" and engine.shards_parameters else placement
        if want == "sharded" and engine.zero3:
            import deepspeed

            model = teacher.model
            teacher.engine, *_ = deepspeed.initialize(
                model=model, config=_teacher_deepspeed_config(trainer, model)
            )
            teacher.model = teacher.engine.module  # DeepSpeed's hooks gather each layer for its forward
            teacher.model.eval()
            engine.teachers[name] = "sharded (DeepSpeed ZeRO-3, inference only)"
        elif want == "sharded" and engine.fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            teacher.model = fsdp2_prepare_model(trainer.accelerator, teacher.model)
            # FSDP keeps a root's parameters gathered after forward, for the backward a teacher never runs.
            teacher.model.set_reshard_after_forward(True)
            teacher.model.eval()
            engine.teachers[name] = "sharded (FSDP2, inference only)"
        elif want == "sharded":
            raise UserError(
                f"$.models.teacher_placement: 'sharded' needs ZeRO-3 or FSDP2, but the engine is {engine.name}"
            )
        else:
            engine.teachers[name] = "replicated"


def setup(trainer, cfg, asked: Requested) -> Engine:
    """After the Trainer is built: the engine in force, checked, with the teachers placed and announced
    (`write_engine_file` records it in the run folder)."""
    from easydistill.runtime import print0

    engine = detect(trainer)
    check_in_force(asked, engine)
    if engine.zero3:
        # Exports (and the model files of checkpoints) are what from_pretrained loads: gathered when saving,
        # whatever accelerate's default; DeepSpeed's own sharded checkpoint is written beside them.
        zero = _deepspeed_config(trainer).setdefault("zero_optimization", {})
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if engine.name.startswith("fsdp"):
        # A sharded state dict would save no model at all (Trainer.save_model writes nothing under FSDP's
        # SHARDED_STATE_DICT): the export and checkpoints hold the full model, gathered on rank 0.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    place_teachers(trainer, engine, cfg)
    print0(engine.line())
    return engine


def _local_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's own copy of `model`'s parameters (a ZeRO-3 partition, an FSDP2 shard, or all)."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local = p.ds_tensor
        elif hasattr(p, "to_local"):
            local = p.to_local()
        else:
            local = p
        total += local.numel() * local.element_size()
    return total


def parameter_bytes(trainer) -> dict[str, list[int]]:
    """Per model (student, each online teacher), the parameter bytes each rank holds; every rank calls it."""
    mine = {"student": _local_bytes(trainer.model)}
    for t in trainer.teachers:
        if t.spec.kind == "online":
            mine[t.spec.name] = _local_bytes(t.model)
    ranks = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    return {name: [r[name] for r in ranks] for name in mine}


def write_engine_file(trainer, output_dir, *, measured: bool = False) -> None:
    """<output_dir>/engine.json: the engine facts; `measured` adds each rank's parameter bytes per model
    (every rank must call it then: the figures are gathered). A start with the same facts leaves the file."""
    import json

    facts = trainer.engine.as_dict()
    if measured:
        facts["parameter_bytes_per_rank"] = parameter_bytes(trainer)
    path = output_dir / "engine.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if trainer.is_world_process_zero() and {k: known.get(k) for k in facts} != facts:
        path.write_text(json.dumps(facts, indent=2) + "\n")  # the same facts again: left as they are
