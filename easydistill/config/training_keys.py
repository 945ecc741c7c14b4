"""The keys `training` may hold: the installed TrainingArguments' fields, read without importing torch.

Reading the dataclass from its source keeps `easydistill.validate` fast (importing transformers' trainer
stack costs seconds); the import is the fallback when the source cannot be parsed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# Keys of TRL's SFTConfig that EasyDistill v1 files carry (v1 handed `training` to SFTConfig whole).
# max_length sets the sequence limit; the others describe SFTTrainer's own data handling and are ignored.
SFT_KEYS = {
    "max_length": "sets the sequence limit, like distillation.max_seq_length",
    "max_seq_length": "sets the sequence limit, like distillation.max_seq_length",
    "dataset_text_field": "ignored: easydistill renders text from the records itself",
    "packing": "ignored: examples are never packed, so teacher rows stay aligned per sample",
    "dataset_num_proc": "ignored",
    "dataset_kwargs": "ignored",
    "completion_only_loss": "ignored: the prompt is always masked",
    "assistant_only_loss": "ignored: only assistant turns carry labels",
}

# Keys of our own inside `training`, removed before TrainingArguments is built.
OWN_KEYS = {"overwrite_output_dir", "skip_nonfinite_steps"}


@functools.cache
def training_argument_types() -> dict[str, str]:
    """Field name -> annotation text of the installed TrainingArguments."""
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.origin:
        source = Path(spec.origin).parent / "training_args.py"
        try:
            return _fields_from_source(source.read_text())
        except (OSError, SyntaxError, LookupError):
            pass
    import dataclasses

    from transformers import TrainingArguments

    return {f.name: str(f.type) for f in dataclasses.fields(TrainingArguments) if f.init}


def _fields_from_source(text: str) -> dict[str, str]:
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            fields = {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
            if "output_dir" in fields and "learning_rate" in fields:
                return fields
    raise LookupError("TrainingArguments not found in source")


def check_value_type(annotation: str, value) -> str | None:
    """A short complaint when `value` cannot be of the annotated type, else None.

    Only the plain scalar annotations are checked here; TrainingArguments itself checks the rest when the
    run starts.
    """
    text = annotation.replace(" ", "")
    allows_none = "None" in text or "Optional" in text
    if value is None:
        return None if allows_none else "must not be null"
    base = text.removeprefix("Optional[").removesuffix("]").replace("|None", "")
    if base == "bool":
        return None if isinstance(value, bool) else f"{value!r} is not of type 'boolean'"
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{value!r} is not of type 'integer'"
    if base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{value!r} is not of type 'number'"
    if base == "str":
        return None if isinstance(value, str) else f"{value!r} is not of type 'string'"
    return None


# Keys that older transformers (and so EasyDistill v1 files) used, with what they become here.
RENAMED_KEYS = {
    "warmup_ratio": "warmup_steps",  # transformers 5 takes a ratio in [0, 1) in warmup_steps
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
}

# Keys that older transformers accepted and that no longer do anything; dropped with a note.
DROPPED_KEYS = {
    "logging_dir": "TensorBoard logs go to output_dir/runs",
}
