"""A tokenizer read straight from a model folder's files (tokenizer.json, tokenizer_config.json, a chat template),
with the few methods rendering and tokenizing use: for `validate`, which imports neither torch nor transformers.

It encodes with the `tokenizers` library, as fast Hugging Face tokenizers do, and renders chat templates with
Jinja in a sandbox, with the helpers Hugging Face templates use (`raise_exception`, `tojson`, loop controls).
A folder without tokenizer.json (a sentencepiece model only) is not readable this way: `load` returns None.
"""

from __future__ import annotations

import json
from pathlib import Path


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class FileTokenizer:
    is_fast = True

    def __init__(self, backend, config: dict, chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        for name in ("eos_token", "pad_token", "bos_token", "unk_token"):
            setattr(self, name, _content(config.get(name)))

    @classmethod
    def load(cls, folder) -> FileTokenizer | None:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, template if isinstance(template, str) else None)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": list(encoding.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(o) for o in encoding.offsets]
        return out

    def apply_chat_template(
        self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **extra
    ):
        if tokenize:
            raise ValueError("FileTokenizer renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template")
        return (
            _environment()
            .from_string(self.chat_template)
            .render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token,
                bos_token=self.bos_token,
                pad_token=self.pad_token,
                unk_token=self.unk_token,
                **extra,
            )
        )


def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env
