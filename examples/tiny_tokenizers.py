"""A second tiny tokenizer, unlike the byte-level BPE of `tiny_models.build_tokenizer`, for cross-tokenizer tests
and demos: sentencepiece-style BPE as Llama and Mistral ship it (word marker "▁", byte fallback "<0xNN>" for
characters it never saw, digits merged as the corpus makes them, where the other splits them one by one), with
other special tokens and another chat template. Built offline, deterministic.
"""

from __future__ import annotations

import json

SP_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
SP_PAD, SP_EOS = "<pad>", "</s>"
# Another chat template than ChatML, so that the two sides render the same conversation differently.
SP_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<s>' + message['role'] + ': ' + message['content'] + '</s>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<s>assistant: ' }}{%- endif -%}"
)


def build_sentencepiece_tokenizer(texts, vocab_size: int = 400):
    """A BPE tokenizer over "▁"-marked words trained on `texts`, with the 256 byte-fallback pieces appended (ids
    after the trained ones, no merges reach them), so that any text without a literal "▁" round-trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SP_SPECIALS), show_progress=False
    )
    bpe.train_from_iterator(list(texts), trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=SP_EOS,
        pad_token=SP_PAD,
        unk_token="<unk>",
        bos_token="<s>",
        chat_template=SP_CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
