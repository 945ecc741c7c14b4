"""Held-out figures for a student and its teacher: teacher-forced CE / KL / agreement, and greedy exact match.

    from easydistill.evaluate import make_batches, teacher_forced_metrics, exact_match_rate

    batches = make_batches(examples, tokenizer.pad_token_id)          # examples from data.build_dataset
    teacher_forced_metrics(student, teacher, batches)  # {"ce", "kl", "top1_agreement", "accuracy", "n_tokens"}
    exact_match_rate(student, tokenizer, records)      # greedy answers vs the records' outputs

Every figure is per response token (positions whose label is not -100, with HF's shift: logits at t predict
token t + 1), so numbers from runs with different batch sizes or padding compare directly. Models are put in
eval mode under no_grad for the measurement and handed back in the mode they came in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from easydistill import losses, synthetic
from easydistill.data import IGNORE_INDEX, KDCollator, render_prompt


@contextlib.contextmanager
def _eval_mode(*models):
    """no_grad + eval mode for the block; every module's training flag is restored afterwards."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def _device(model) -> torch.device:
    return next(model.parameters()).device


def make_batches(examples, pad_token_id: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """TokenizedExamples (from `data.build_dataset`) -> right-padded batches as the trainer collates them."""
    collate = KDCollator(pad_token_id)
    examples = list(examples)
    return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def teacher_forced_metrics(student, teacher, batches: Iterable[dict]) -> dict:
    """Per-token figures of `student` on labelled batches, against `teacher` when one is given.

    batches: dicts with input_ids, attention_mask, labels (B, T), labels -100 where nothing is predicted.
    Returns
      ce              cross-entropy of the student on the labels (nats per token, full student vocabulary)
      accuracy        student argmax == label
      kl              KL(p_teacher ‖ p_student) per token, both cut to the shared vocabulary width
                      (padded embedding rows are not tokens), as `losses` computes it at temperature 1
      top1_agreement  student argmax == teacher argmax on the shared vocabulary
      n_tokens        how many positions were counted
    kl and top1_agreement are None without a teacher. Both models see the same inputs in eval mode.
    """
    ce_sum = kl_sum = 0.0
    correct = agree = n_tokens = 0
    with _eval_mode(student, teacher):
        device = _device(student)
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            labels = batch["labels"].to(device)
            mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
            targets = labels[:, 1:][mask]  # (N,)
            s_rows = student(**inputs).logits[:, :-1][mask].float()  # (N, V_s)
            ce_sum += float(F.cross_entropy(s_rows, targets, reduction="sum"))
            correct += int((s_rows.argmax(-1) == targets).sum())
            n_tokens += int(targets.numel())
            if teacher is None:
                continue
            t_inputs = {k: v.to(_device(teacher)) for k, v in inputs.items()}
            t_rows = (
                teacher(**t_inputs).logits[:, :-1][mask.to(_device(teacher))].to(device).float()
            )  # (N, V_t)
            kl_sum += float(losses.divergence(s_rows, t_rows, "forward_kld", reduction="sum"))
            shared = min(s_rows.shape[-1], t_rows.shape[-1])
            agree += int((s_rows[:, :shared].argmax(-1) == t_rows[:, :shared].argmax(-1)).sum())
    n = max(n_tokens, 1)
    return {
        "ce": ce_sum / n,
        "accuracy": correct / n,
        "kl": kl_sum / n if teacher is not None else None,
        "top1_agreement": agree / n if teacher is not None else None,
        "n_tokens": n_tokens,
    }


def _stop_ids(model, tokenizer) -> set[int]:
    """eos of the tokenizer plus whatever the model's generation config stops on (Qwen lists several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    return ids


def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of `prompts` (already rendered text), decoded without the stop token.

    Batches are left-padded so that every row's next token sits in the last column; positions count from
    each row's first real token, so a padded row computes exactly what it would alone. The KV cache carries
    the prefix: each later step feeds one token per row. A row stops at its first stop token (eos, or any id
    in the model's generation_config.eos_token_id); the batch stops when every row has.
    """
    from transformers import DynamicCache

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_ids(model, tokenizer)
    stop = torch.tensor(sorted(stop_ids))
    outputs: list[str] = []
    with _eval_mode(model):
        device = _device(model)
        stop = stop.to(device)
        for start in range(0, len(prompts), batch_size):
            encoded = [
                tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            input_ids, attention = input_ids.to(device), attention.to(device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
            cache = DynamicCache()
            done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
            generated = []
            step_ids = input_ids
            for _ in range(max_new_tokens):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                next_ids = out.logits[:, -1].argmax(-1)  # (B,)
                next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
                generated.append(next_ids)
                done |= torch.isin(next_ids, stop)
                if bool(done.all()):
                    break
                step_ids = next_ids[:, None]  # (B, 1)
                attention = torch.cat([attention, torch.ones_like(step_ids)], dim=-1)
                positions = positions[:, -1:] + 1
            tokens = torch.stack(generated, dim=-1).tolist() if generated else [[] for _ in encoded]
            for row in tokens:
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return outputs


def _chat_record(record: dict, index: int) -> dict:
    """A synthetic `{instruction, output}` record (or one already in data's chat form) in chat form."""
    if "messages" in record:
        return {"source": f"record {index}", **record}
    return {
        "id": str(index),
        "source": f"record {index}",
        "messages": [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["output"]},
        ],
    }


def answers_and_references(
    model, tokenizer, records, template_path=None, *, max_new_tokens: int | None = None, batch_size: int = 64
) -> tuple[list[str], list[str]]:
    """(greedy answers, reference answers) for labelled records, prompts rendered as training renders them."""
    chats = [_chat_record(r, i) for i, r in enumerate(records)]
    references = [c["messages"][-1]["content"] for c in chats]
    prompts = [render_prompt(c, tokenizer, template_path=template_path) for c in chats]
    if max_new_tokens is None:  # room for the longest reference plus its stop token
        longest = max(
            (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0
        )
        max_new_tokens = longest + 2
    return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size), references


def exact_match_rate(model, tokenizer, records, template_path=None, **kwargs) -> float:
    """Share of records whose greedy answer equals the reference output (`synthetic.exact_match`)."""
    answers, references = answers_and_references(model, tokenizer, records, template_path, **kwargs)
    return synthetic.accuracy(answers, references)
