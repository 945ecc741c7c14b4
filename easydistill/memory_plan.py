"""A memory plan before anything loads: what one KD training step holds on each device, term by term.

The library behind `python -m easydistill.plan`.

Parameter counts come from each model's config.json, built on the meta device (no weights read); LoRA
parameters from the targeted linear layers' shapes; bytes from the configured dtypes. The terms:

  weights      every parameter of the student, of each online teacher (a self-teacher shares the student's)
  gradients    one per trainable parameter, in its dtype (alive from backward until the optimizer step)
  optimizer    AdamW: exp_avg and exp_avg_sq per trainable parameter, in its dtype
  activations  what autograd saves for backward in each decoder layer (see `layer_activation_elements`)
  logits/loss  the tensors KDTrainer.compute_loss holds at its peak (see `loss_terms`)

and the peak of a step is the weights and optimizer states plus the largest of three moments: the loss's
forward (activations + its tensors), the start of backward (activations + the loss's saved tensors + the
gradients in flight), the optimizer step (every gradient). Assumed, and said in the output: every position of
every sequence is a label position and every batch is padded to max_seq_length (an upper bound for the logits
terms); a Llama-style decoder layer (RMSNorm, rotary attention with grouped KV heads, gated MLP: Llama, Qwen2,
Mistral) run by a fused attention kernel (no T x T matrix saved; with padding the KV heads are repeated to the
query heads); no gradient checkpointing unless the config turns it on; AdamW. Not counted: the CUDA context,
allocator caching and fragmentation, framework workspaces, the data loader. docs/memory.md explains the
accounting and how `--measure` (easydistill/memory_measure.py, and tests/test_plan.py) compares it with a real
run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from easydistill.config.chunk_size import AUTO, auto_chunk_size

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20


# ---------------------------------------------------------------- architectures, from config.json on meta


@dataclass
class Arch:
    path: str
    dtype: str  # the checkpoint's own dtype (config.json), used for "auto"
    params: int  # every parameter, tied ones once
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # embedding rows = logits columns
    linear: dict[str, tuple[int, int]] = field(default_factory=dict)  # module name -> (in, out) features


def read_arch(path: str, trust_remote_code: bool = False) -> Arch:
    """Sizes of a causal LM from its config.json, the module tree built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "float32")
    return Arch(
        path=path,
        dtype=dtype.replace("torch.", ""),
        params=sum(p.numel() for p in model.parameters()),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=model.get_output_embeddings().weight.shape[0],
        linear={
            name: (m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        },
    )


def lora_params(arch: Arch, lora) -> int:
    """r * (in + out) per targeted Linear (peft's A and B), plus full copies of modules_to_save."""
    targets = lora.target_modules
    total = 0
    for name, (fan_in, fan_out) in arch.linear.items():
        leaf = name.rsplit(".", 1)[-1]
        hit = (
            leaf != "lm_head"
            if targets == "all-linear"
            else any(name == t or name.endswith("." + t) or leaf == t for t in targets)
        )
        if hit:
            total += lora.r * (fan_in + fan_out)
    for name in lora.modules_to_save or []:
        for module, (fan_in, fan_out) in arch.linear.items():
            if module.rsplit(".", 1)[-1] == name:
                total += fan_in * fan_out
        if name in ("embed_tokens", "wte"):
            total += arch.vocab * arch.hidden
    return total


# ---------------------------------------------------------------- the accounting


@dataclass
class Term:
    owner: str  # "student", a teacher's name, or "loss"
    what: str
    bytes: int
    how: str  # the formula, for the table

    @property
    def mib(self) -> float:
        return self.bytes / MIB


def norm_bytes(act_bytes: int) -> int:
    """Bytes per hidden element an RMSNorm keeps: its input (or, in half precision, the fp32 copy it takes of
    it), the normalised rows and the scaled output; half precision keeps the normalised rows in both dtypes
    minus the fp32 ones, which only feed the cast: 4 + 2 + 2 bytes instead of 3 x 4."""
    return 3 * 4 if act_bytes == 4 else 4 + 2 * act_bytes


def layer_activation_elements(arch: Arch, repeat_kv: bool = True) -> int:
    """Elements per token that autograd keeps for backward in one decoder layer, besides its two RMSNorms.

    attention: rotated queries, keys and values (repeated to the query heads when a padding mask is given),
    the attention output and the o_proj input (5 heads * head_dim); gated MLP: gate and up outputs, SiLU
    output, their product (4 I). Projections' outputs that only feed RoPE or a reshape (q, k, v before
    rotation or repetition) are not kept. Each RMSNorm adds `norm_bytes` per hidden element (the input
    RMSNorm's input is the layer's input, the post-attention one's the residual sum).
    """
    q = arch.heads * arch.head_dim
    kv = q if repeat_kv else arch.kv_heads * arch.head_dim
    return (q + 2 * kv + 2 * q) + 4 * arch.intermediate


@dataclass
class Sizes:
    batch: int
    seq: int
    rows: int  # label positions N per micro-batch (upper bound: batch * (seq - 1))


def activation_bytes(arch: Arch, sizes: Sizes, act_bytes: int, checkpointing: bool) -> tuple[int, str]:
    tokens = sizes.batch * sizes.seq
    norms = norm_bytes(act_bytes) * arch.hidden * tokens
    per_layer = layer_activation_elements(arch) * tokens * act_bytes + 2 * norms
    final = norms  # the final norm; its output is what the head keeps
    mask = sizes.batch * sizes.seq * sizes.seq  # the (B, 1, T, T) boolean attention mask, shared by layers
    formula = (
        f"{layer_activation_elements(arch)} x {act_bytes} + 2 norms x {norm_bytes(act_bytes)}H bytes/token"
    )
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time in backward
        total = arch.layers * arch.hidden * tokens * act_bytes + per_layer + final + mask
        return total, f"L x B*T*H x {act_bytes} + one layer ({formula}) + final norm"
    total = arch.layers * per_layer + final + mask
    return total, f"L x B*T x ({formula}) + final norm + mask B*T^2"


def loss_terms(
    path: str,
    sizes: Sizes,
    v_student: int,
    b_student: int,
    teachers: list[tuple[str, int, int, str]],
    chunk: int,
    head_grad: int = 0,
) -> tuple[list[Term], list[Term]]:
    """(tensors alive at the loss's peak, tensors autograd saves for backward) of compute_loss.

    teachers: (name, logits columns, logits bytes, kind) per teacher. Dense divergence (loss/divergence.py), one teacher
    after another (loss/combine.py, weighted_loss): for each, the student's log-probabilities are made
    (x / T -> clamp -> log_softmax: the division's output is saved by clamp, the log-softmax's output by the
    KL), the teacher's (no grad), then p_T = exp(log p_T) (saved by the product) and the difference and
    product of the KL sum. CE keeps its log-softmax (fp32). `path`:
      label_rows  logits only at the N label positions (logits_to_keep), teachers' rows projected likewise
      fused       `chunk` positions at a time (fused.py): ~5 fp32 (chunk, V) buffers and the fp32 gradient
                  accumulator of a trainable head (V, H); nothing (N, V) is held
    """
    n = sizes.rows
    peak: list[Term] = []
    saved: list[Term] = []
    if path == "fused":
        buffers = 5 + sum(1 for _, v, _, _ in teachers if v != v_student)  # z, p, pt, a, teacher + narrower
        peak.append(
            Term("loss", "chunk buffers", buffers * chunk * v_student * 4, f"{buffers} x chunk x V x 4")
        )
        if head_grad:  # the head's gradient, accumulated chunk by chunk beside the one backward hands over
            peak.append(Term("loss", "head gradient accumulator (fp32)", head_grad, "V x H x 4"))
        return peak, saved
    peak.append(Term("loss", "student label rows", n * v_student * b_student, "N*V x dtype"))
    peak.append(Term("loss", "CE log-softmax (saved)", n * v_student * 4, "N*V x 4"))
    saved.append(Term("loss", "CE log-softmax", n * v_student * 4, "N*V x 4"))
    for i, (name, v_t, b_t, kind) in enumerate(teachers):
        shared = min(v_student, v_t)
        if kind == "cached":
            # SparseRows: the student's (N, W) log-probabilities, a column mask and the tail's masked copy
            peak.append(Term("loss", f"{name}: stored-row divergence", 3 * n * shared * 4, "3 x N*W x 4"))
            saved.append(Term("loss", f"{name}: student log-probs", 2 * n * shared * 4, "2 x N*W x 4"))
            continue
        peak.append(Term("loss", f"{name}: teacher label rows", n * v_t * b_t, "N*V_t x dtype"))
        kept = 3 * n * shared * 4  # x / T (saved by clamp), log p_S (saved), p_T (saved)
        saved.append(Term("loss", f"{name}: x/T, log p_S, p_T", kept, "3 x N*V x 4"))
        if i < len(teachers) - 1:
            peak.append(Term("loss", f"{name}: x/T, log p_S, p_T (saved)", kept, "3 x N*V x 4"))
        else:  # the last teacher's KL at its peak: the saved three + log p_T + difference + product
            peak.append(Term("loss", f"{name}: KL at its peak", 6 * n * shared * 4, "6 x N*V x 4"))
    return peak, saved


@dataclass
class Plan:
    terms: list[Term]  # static terms and the loss terms
    sizes: Sizes
    moments: dict[str, int]  # the three candidate peaks, bytes
    peak: int
    path: str
    notes: list[str]

    def table(self) -> str:
        lines = [f"{'owner':16s}{'term':40s}{'MiB':>12s}  formula", "-" * 96]
        for t in self.terms:
            lines.append(f"{t.owner[:15]:16s}{t.what[:39]:40s}{t.mib:12.1f}  {t.how}")
        lines.append("-" * 96)
        for name, value in self.moments.items():
            lines.append(f"{'moment':16s}{name:40s}{value / MIB:12.1f}")
        lines.append(f"{'PEAK per device':56s}{self.peak / MIB:12.1f}  (each DDP process holds all of it)")
        return "\n".join(lines)


def _dtype(name: str, arch: Arch) -> str:
    return arch.dtype if name == "auto" else name


def loss_path(cfg) -> str:
    """Which of compute_loss's paths the run takes (see `loss_terms`): KDTrainer goes through
    train.step.kd_step, which computes logits at the label positions only (chunk_size 0) or a chunk at a time
    (chunk_size > 0). tests/test_plan.py measures a real step, so a change of the loop that this accounting
    misses fails there."""
    return "label_rows" if cfg.distillation.chunk_size == 0 else "fused"


def chunk_size(cfg, student: Arch) -> int:
    """distillation.chunk_size, "auto" resolved as the trainer resolves it (train/step.choose_loss_path)."""
    setting = cfg.distillation.chunk_size
    if setting != AUTO:
        return setting
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_teachers = sum(1 for t in cfg.teachers if t.kind != "cached")
    return auto_chunk_size(student.vocab, student.hidden, device, model_teachers)


def make_plan(cfg, archs: dict[str, Arch] | None = None) -> Plan:
    """The plan of a checked config. `archs` (path -> Arch) skips reading config.json files (tests)."""
    archs = dict(archs or {})

    def arch_of(path: str) -> Arch:
        if path not in archs:
            archs[path] = read_arch(path, cfg.models.trust_remote_code)
        return archs[path]

    m, t = cfg.models, cfg.training
    student = arch_of(m.student)
    s_dtype = _dtype(m.dtype, student)
    b_s = BYTES[s_dtype]
    mixed = bool(t.bf16 or t.fp16)
    act = 2 if (b_s == 2 or mixed) else 4
    batch = t.per_device_train_batch_size or 8
    seq = cfg.max_length
    sizes = Sizes(batch, seq, batch * (seq - 1))
    terms: list[Term] = []
    notes = [
        f"batch {batch} x max_seq_length {seq}; every position a label (N = {sizes.rows}), batches padded to "
        "max_seq_length: the logits terms are upper bounds",
        "Llama-style decoder layers with a fused attention kernel; AdamW; no allocator caching counted",
    ]

    terms.append(Term("student", f"weights ({s_dtype})", student.params * b_s, f"{student.params:,} x {b_s}"))
    if cfg.lora.enable:
        trainable = lora_params(student, cfg.lora)
        # peft keeps adapters in fp32 when the base is half precision (autocast_adapter_dtype)
        b_train = 4
        terms.append(Term("student", "LoRA adapter weights (fp32)", trainable * 4, f"{trainable:,} x 4"))
    else:
        trainable, b_train = student.params, b_s
    grads = trainable * b_train
    optimizer = 2 * trainable * b_train
    terms.append(Term("student", "gradients", grads, f"{trainable:,} trainable x {b_train}"))
    terms.append(Term("student", "optimizer (AdamW m, v)", optimizer, f"2 x {trainable:,} x {b_train}"))
    checkpointing = bool(t.gradient_checkpointing or t.activation_checkpointing)
    activations, how = activation_bytes(student, sizes, act, checkpointing)
    terms.append(Term("student", "activations saved for backward", activations, how))

    teacher_logits = []
    for spec in cfg.teachers:
        if spec.kind == "self":
            teacher_logits.append((spec.name, student.vocab, b_s, "self"))
            notes.append(f"teacher {spec.name!r}: the student's own base weights (no second copy)")
            continue
        if spec.kind == "cached":
            teacher_logits.append((spec.name, student.vocab, 4, "cached"))
            notes.append(f"teacher {spec.name!r}: stored top-k rows, read per batch (no weights)")
            continue
        arch = arch_of(spec.path)
        t_dtype = _dtype(m.teacher_dtype, arch)
        b_t = BYTES[t_dtype]
        what = "weights, during its forward only (offload)" if m.teacher_offload else f"weights ({t_dtype})"
        terms.append(Term(spec.name, what, arch.params * b_t, f"{arch.params:,} x {b_t}"))
        # its forward runs under no_grad: one layer's outputs at a time (gate, up, product: 3 x B*T*I)
        terms.append(
            Term(
                spec.name,
                "forward, transient (no grad)",
                3 * batch * seq * arch.intermediate * b_t,
                "3 x B*T*I",
            )
        )
        teacher_logits.append((spec.name, arch.vocab, b_t, "online"))
        if m.teacher_offload:
            notes.append(
                f"teacher {spec.name!r}: teacher_offload: its weights visit the device for its forward only"
            )

    path = loss_path(cfg)
    head_trains = not cfg.lora.enable or "lm_head" in (cfg.lora.modules_to_save or [])
    peak_terms, saved_terms = loss_terms(
        path,
        sizes,
        student.vocab,
        b_s,
        teacher_logits,
        chunk_size(cfg, student),
        head_grad=student.vocab * student.hidden * 4 if head_trains else 0,
    )
    terms += peak_terms
    resident = [x for x in terms if x.what.startswith(("weights", "LoRA")) and "offload" not in x.what]
    static = sum(x.bytes for x in resident)
    visiting = {x.owner: x.bytes for x in terms if "offload" in x.what}
    teacher_forward = max(
        [x.bytes + visiting.get(x.owner, 0) for x in terms if x.what.startswith("forward, transient")] or [0]
    )
    loss_peak = sum(x.bytes for x in peak_terms)
    saved = sum(x.bytes for x in saved_terms)
    in_flight = 2 * sizes.rows * student.vocab * 4 if path != "fused" else 0  # gradient and its successor
    moments = {
        "loss forward: activations + loss tensors": activations + max(loss_peak, teacher_forward),
        "backward start: activations + saved + grads": activations + saved + in_flight,
        "optimizer step: all gradients": grads,
    }
    peak = static + optimizer + max(moments.values())
    moments = {k: static + optimizer + v for k, v in moments.items()}
    return Plan(terms, sizes, moments, peak, path, notes)
