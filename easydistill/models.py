"""Loading the student (full or LoRA) and online teachers (weights from safetensors only); a causal LM's final
hidden states, its head, and its logits at the label positions only."""

from __future__ import annotations

import contextlib
import inspect

import torch

from easydistill.config import Config
from easydistill.errors import UserError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions carry label -100 and attention 0, so any id will do; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, *, dtype: str, trust_remote_code: bool, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:  # e.g. only .bin weights: we refuse to unpickle them
        raise UserError(f"{path}: cannot load safetensors weights ({exc})") from None


def lora_config(cfg: Config):
    from peft import LoraConfig

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def load_student(cfg: Config):
    """The student as Trainer will train it: a PEFT model when LoRA is on, else the plain model."""
    m = cfg.models
    model = load_causal_lm(
        m.student,
        dtype=m.dtype,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
    )
    if not cfg.lora.enable:
        return model
    from peft import PeftModel, get_peft_model

    if cfg.lora.init_from:
        model = PeftModel.from_pretrained(model, cfg.lora.init_from, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(cfg))
    if cfg.training.gradient_checkpointing or cfg.training.activation_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; LoRA weights inside them would then
        # get no gradient. Marking the embedding output as requiring grad keeps the graph connected.
        model.enable_input_require_grads()
    return model


def load_frozen_teacher(path: str, cfg: Config, device: torch.device):
    m = cfg.models
    model = load_causal_lm(
        path,
        dtype=m.teacher_dtype,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
    )
    model.requires_grad_(False)
    model.eval()
    return model.to(device)


def trainable_summary(model) -> str:
    def numel(p):  # ZeRO-3 keeps a partition (ds_numel is the full size)
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


@contextlib.contextmanager
def outside_zero3_init():
    """Models loaded inside are whole, even while a ZeRO-3 config is active (which makes from_pretrained
    partition them with zero.Init): a teacher that is to be replicated or offloaded, not sharded."""
    from transformers.integrations import deepspeed as hf_deepspeed

    current = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None  # is_deepspeed_zero3_enabled() is False inside
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = current


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off inside; every submodule's training flag restored exactly on the way out."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


@contextlib.contextmanager
def quiet_loading():
    """No per-file progress bars from transformers inside (loading and saving small models draws one per
    call); the previous setting comes back on the way out. Trainer's training bar is its own and stays."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def final_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) last hidden states (after the final norm) of a causal LM, with no logits computed: an empty
    `logits_to_keep` leaves the head nothing to project."""
    keep_none = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=keep_none,
        use_cache=False,
    )
    return out.hidden_states[-1]


def project(head: torch.nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None, device=None):
    """head(hidden) for (n, H) rows; a plain Linear head writes into `out` (n, V) when given and of its dtype,
    so that a caller projecting many slices reuses one buffer instead of allocating (tokens x vocab) each time."""
    # Mixed precision may hand over fp32 hidden states (accelerate converts outputs) for a bf16 head.
    hidden = hidden.to(next(head.parameters()).dtype)
    if not (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward):
        return head(hidden)  # not a plain projection (loss.chunked.plain_linear: FSDP2's FSDPLinear is one)
    weight, bias = head.weight, head.bias
    if device is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    if out is None or out.dtype != weight.dtype or out.shape != (hidden.shape[0], weight.shape[0]):
        return torch.nn.functional.linear(hidden, weight, bias)
    torch.mm(hidden, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


# Config keys of models that rescale or squash the head's output after the matmul: applying the head weight
# ourselves would skip that step, so such models take the plain path.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/compile wrappers (the PEFT model stays: its adapters are part of the student)."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under wrappers and PEFT."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def head_unsupported(model: torch.nn.Module) -> str | None:
    """Why this causal LM's logits are not just `get_output_embeddings()(final hidden)`; None when they are."""
    base = base_model(model)
    if not _takes_logits_to_keep(base):
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    if base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for key in _LOGIT_POSTPROCESSING:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            return f"{type(base).__name__} post-processes its logits ({key}={value})"
    return None


def logits_at_labels(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """(N, V) logits at the label positions `mask` (B, T-1) selects only (`logits_to_keep` as a boolean (B, T)
    mask), through the model's own forward (DDP hooks, post-processing); full logits then a gather if it
    cannot do that."""
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    n = int(mask.sum())
    if _takes_logits_to_keep(model):
        keep = torch.nn.functional.pad(
            mask, (0, 1), value=False
        )  # (B, T): the last position predicts nothing
        logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
        if logits.dim() == 2 and logits.shape[0] == n:
            return logits
    return model(**kwargs).logits[:, :-1][mask]


def hidden_at_labels(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """(N, H) final hidden states at the label positions, through the model's own forward (so DDP prepares its
    backward) with no logits computed."""
    return final_hidden_states(model, inputs)[:, :-1][mask]
