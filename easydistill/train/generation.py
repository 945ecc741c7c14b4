"""The one way easydistill generates text: teacher answers (store/answers.py), on-policy and seq_kd samples
(train/on_policy.py) and greedy answers for exact match (evaluation/exact_match.py).

Every caller gets the same conventions:
- prompts are left-padded, so the next token of every row sits in the last column; the attention mask marks
  the padding, and `generate` derives position ids from it, so a padded row computes what it would alone;
- a row stops at its first stop id: the tokenizer's eos and every id of the model's
  `generation_config.eos_token_id` (Qwen lists several); rows that stopped are padded until all have;
- ids past the tokenizer's vocabulary (the padding rows of Qwen-style embedding matrices) are never picked:
  they decode to nothing and may not exist in the other model at all;
- temperature 0 is greedy; above 0 tokens are sampled from softmax(logits / temperature), cut to the top_p
  nucleus, with no top-k cut (the model's own distribution, as GKD samples it);
- the KV cache is on; the model is in eval mode (dropout off) for the call and handed back as it came.

Which temperature: `inference.temperature` for teacher answers (unset: greedy) and for on-policy / seq_kd
completions (unset: 1, the policy's own distribution). `distillation.temperature` scales the loss only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ON_POLICY_TEMPERATURE = 1.0  # inference.temperature unset: sample the policy's own distribution
ANSWER_TEMPERATURE = 0.0  # inference.temperature unset: teacher answers are greedy


@dataclass(frozen=True)
class Sampling:
    """How one call generates: up to `max_new_tokens`, greedy at temperature 0, else sampled."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def answer_sampling(cfg) -> Sampling:
    """Teacher-written answers: the `inference` block (greedy when inference.temperature is unset)."""
    i = cfg.inference
    temperature = ANSWER_TEMPERATURE if i.temperature is None else i.temperature
    return Sampling(i.max_new_tokens, temperature, i.top_p)


def on_policy_sampling(cfg) -> Sampling:
    """On-policy and seq_kd completions: inference.temperature (unset: 1), distillation's length and top_p."""
    d, temperature = cfg.distillation, cfg.inference.temperature
    return Sampling(d.max_new_tokens, ON_POLICY_TEMPERATURE if temperature is None else temperature, d.top_p)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos and whatever the model's generation config stops on, sorted."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    return sorted(ids)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids, attention mask), both (B, T), each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class RealVocabulary:
    """A logits processor that never lets a model pick an id at or past `size` (the tokenizer's length)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.size :] = -float("inf")
        return scores


def generation_options(sampling: Sampling, *, pad: int, stops: Sequence[int], vocab_size: int) -> dict:
    """Keyword arguments of `model.generate` that carry the conventions above."""
    from transformers import GenerationConfig, LogitsProcessorList

    drawn = (
        {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    )
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=list(stops),
        use_cache=True,
        do_sample=not sampling.greedy,
        **drawn,
    )
    return {
        "generation_config": config,
        "logits_processor": LogitsProcessorList([RealVocabulary(vocab_size)]),
    }


@torch.no_grad()
def continue_rows(
    generate: Callable[..., torch.Tensor],
    prompts: Sequence[torch.Tensor],
    sampling: Sampling,
    *,
    pad: int,
    stops: Sequence[int],
    vocab_size: int,
) -> torch.Tensor:
    """(B, G) the tokens `generate` (a model's, or a teacher's) writes after each prompt; pad after a stop."""
    ids, mask = left_pad(prompts, pad)
    options = generation_options(sampling, pad=pad, stops=stops, vocab_size=vocab_size)
    out = generate(input_ids=ids, attention_mask=mask, **options)
    return out[:, ids.shape[1] :]


def cut_at_stop(row: Sequence[int], stops) -> list[int]:
    """The tokens of one generated row before its first stop id."""
    row = list(row)
    return row[: next((i for i, t in enumerate(row) if t in stops), len(row))]


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    batch_size: int = 8,
    seed: int | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """One continuation per rendered prompt, in order, decoded up to its first stop id.

    Prompts are batched by length (less padding). With a seed, sampling is seeded once before the first batch,
    so a run repeats; the batch a prompt lands in does not change a greedy answer.
    """
    from tqdm.auto import tqdm
    from transformers import set_seed

    from easydistill.models import eval_mode

    if seed is not None:
        set_seed(seed)
    pad, stops = pad_id(tokenizer), stop_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    texts = [""] * len(prompts)
    with eval_mode(model), tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [torch.tensor(encoded[i], dtype=torch.long, device=device) for i in chunk]
            new = continue_rows(
                model.generate, rows, sampling, pad=pad, stops=stops, vocab_size=len(tokenizer)
            )
            for i, row in zip(chunk, new.tolist()):
                texts[i] = tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True)
            bar.update(len(chunk))
    return texts
