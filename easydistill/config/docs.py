"""docs/config.md, generated from schema.json (a test fails when the file is stale).

python -m easydistill.config.docs --write docs/config.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from easydistill.config.load import schema
from easydistill.config.training_keys import DROPPED_KEYS, RENAMED_KEYS, SFT_KEYS

HEADER = """# Config reference

<!-- Generated from easydistill/config/schema.json by `make docs`; edit the schema, not this file. -->

A run is one JSON object. Blocks follow EasyDistill v1 (`job_type`, `dataset`, `inference`, `distillation`,
`models`, `training`) plus `lora`. Unknown keys are errors (with a did-you-mean); every problem is reported at
once with its JSON path, and `python -m easydistill.validate --config FILE` checks a file without loading weights.
Relative paths are read from the directory the command runs in, as in EasyDistill v1.
"""


def _type_text(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "anyOf" in node:
        return " or ".join(_type_text(n) for n in node["anyOf"])
    if "$ref" in node:
        return "teacher object (below)"
    kind = node.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array" and "items" in node:
        return f"list of {_type_text(node['items'])}"
    return kind


def _range_text(node: dict) -> str:
    parts = []
    for key, sign in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in node:
            parts.append(f"{sign} {node[key]}")
    return ", ".join(parts)


def _rows(properties: dict, required: set[str]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, node in properties.items():
        kind = _type_text(node)
        bounds = _range_text(node)
        if bounds:
            kind += f" ({bounds})"
        default = (
            "required"
            if key in required
            else (f"`{json.dumps(node['default'])}`" if "default" in node else "—")
        )
        description = node.get("description", "").replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | {default} | {description} |")
    return rows


def render(s: dict | None = None) -> str:
    s = s or schema()
    out = [HEADER]
    top = s["properties"]
    scalars = {k: v for k, v in top.items() if v.get("type") != "object"}
    out += ["## Top level", "", *_rows(scalars, set(s.get("required", []))), ""]
    for block, node in top.items():
        if node.get("type") != "object":
            continue
        out += [f"## `{block}`", "", node.get("description", ""), ""]
        out += _rows(node.get("properties", {}), set(node.get("required", [])))
        out.append("")
        if block == "models":
            entry = s["$defs"]["teacher_entry"]
            out += [
                "### Teacher objects (`models.teacher` as a list of objects)",
                "",
                "Each needs `path` or `logits_path`.",
                "",
                *_rows(entry["properties"], set()),
                "",
            ]
        if block == "training":
            out += [
                "Besides these, `training` takes every field of the installed transformers' `TrainingArguments` "
                "(checked by name and, for plain scalars, by type). `remove_unused_columns` is always false and "
                '`label_names` is `["labels"]`; `report_to` defaults to `"none"`.',
                "",
                "Keys EasyDistill v1 files carry that are read differently:",
                "",
                "| key | what happens |",
                "| --- | --- |",
                *[f"| `{k}` | read as `{v}` |" for k, v in RENAMED_KEYS.items()],
                *[f"| `{k}` | {v} |" for k, v in SFT_KEYS.items()],
                *[f"| `{k}` | ignored: {v} |" for k, v in DROPPED_KEYS.items()],
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easydistill.config.docs", description=__doc__.splitlines()[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH")
    group.add_argument("--check", metavar="PATH")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text)
        return 0
    if Path(args.check).read_text() != text:
        print(f"{args.check} is stale: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
