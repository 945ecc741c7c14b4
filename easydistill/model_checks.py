"""What a model or adapter folder must hold before anything loads, read as JSON and bytes (no torch).

A folder the config names is checked for: a config.json that parses to an object; weights in safetensors whose
headers describe exactly the bytes on disk (a truncated or cut-off file is found here, not halfway through a
load); tokenizer files; and the packages its quantization needs. An adapter folder must hold its weights as
adapter_model.safetensors: `.bin` files are pickles, which easydistill never loads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors caps its JSON header at 100 MB
# quantization_config.quant_method -> the package that loads it
QUANTIZATION_PACKAGES = {"bitsandbytes": "bitsandbytes", "gptq": "optimum", "awq": "awq", "hqq": "hqq"}


def read_json_object(file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in `file`, None) or (None, what is wrong with it)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return None, f"{file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        return None, f"{file}: cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict):
        return None, f"{file}: must hold a JSON object, not {type(data).__name__}"
    return data, None


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be complete (its header does not describe its size), or None."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{file}: truncated ({size} bytes, shorter than a safetensors header)"
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                return (
                    f"{file}: truncated or not safetensors (header of {length} bytes in a {size}-byte file)"
                )
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"{file}: cannot be read ({exc.strerror or exc})"
    except (ValueError, RecursionError):
        return f"{file}: not a safetensors file (its header is not JSON)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{file}: not a safetensors file (unexpected header)"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{file}: truncated or damaged ({size} bytes on disk, its header describes {expected})"
    return None


def weights_problems(folder: Path) -> list[str]:
    """The model's safetensors weights are there and whole (shards of an index too)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data, problem = read_json_object(index)
        if problem:
            return [problem]
        shards = sorted(set((data.get("weight_map") or {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return [f"{index}: lists shards that are missing: {', '.join(missing)}"]
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            return [
                f"{folder}: holds no model.safetensors, only {', '.join(pickles[:3])} (pickle); easydistill loads "
                "safetensors only: convert them (save_pretrained(..., safe_serialization=True)) in an environment you trust"
            ]
        return [f"{folder}: holds no model.safetensors (or model.safetensors.index.json)"]
    return [p for p in map(safetensors_problem, files) if p]


def model_folder_problems(folder: str | Path, *, needs_weights: bool = True) -> list[str]:
    """Every problem of a model folder found from its files: config, weights, tokenizer, packages."""
    folder = Path(folder)
    config, problem = read_json_object(folder / "config.json")
    if problem:
        return [problem]
    problems = weights_problems(folder) if needs_weights else []
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            f"{folder}: holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
            "beside the model (tokenizer.save_pretrained(folder))"
        )
    method = (config.get("quantization_config") or {}).get("quant_method")
    package = QUANTIZATION_PACKAGES.get(str(method))
    if package and importlib.util.find_spec(package) is None:
        problems.append(
            f"{folder}: its weights are quantized with {method}, which needs the {package} package "
            f"(pip install {package})"
        )
    return problems


def adapter_folder_problems(folder: str | Path) -> list[str]:
    """A PEFT adapter folder easydistill will load: adapter_config.json and whole adapter_model.safetensors."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        return [f"{folder}: holds no adapter_config.json (not a PEFT adapter folder)"]
    _, problem = read_json_object(folder / "adapter_config.json")
    if problem:
        return [problem]
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        problem = safetensors_problem(weights)
        return [problem] if problem else []
    if (folder / "adapter_model.bin").is_file():
        return [
            f"{folder}: holds adapter_model.bin, a pickle, which easydistill never loads; convert it to "
            "adapter_model.safetensors in an environment you trust (load it, then save_pretrained(folder, "
            "safe_serialization=True))"
        ]
    return [f"{folder}: holds no adapter_model.safetensors"]
