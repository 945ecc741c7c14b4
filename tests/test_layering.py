"""The import direction, read from the source (ast), not from what happens to be imported at run time.

- loss/ is pure tensor code: it imports torch, the standard library and itself, nothing else;
- the library never imports a command module (kd/*, validate, merge, eval, plan, cli) nor examples/
  (the quickstart, synthetic tasks and tiny models are built on the library, never under it);
- no private name (`_name`) is taken from another module, by import or by attribute.

Function-level imports count as much as top-level ones.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "easydistill"
COMMANDS = (
    "easydistill.kd",
    "easydistill.validate",
    "easydistill.merge",
    "easydistill.eval",
    "easydistill.plan",
    "easydistill.__main__",
)
COMMANDS += ("easydistill.cli",)
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path).split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here if is_package(path) else here[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, base, alias.name) for alias in node.names]
    return found


def private_attributes(path: Path) -> list[tuple[int, str]]:
    """`alias._name` where alias is a module of ours bound by an import in this file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {
                a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("easydistill")
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("easydistill"):
            modules |= {a.asname or a.name for a in node.names}  # may be a submodule: checked below
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and is_private(node.attr)
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations(files, rule) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {what}" for path in files for line, what in rule(path)]


def loss_rule(path: Path):
    for line, module, _ in imports(path):
        top = module.split(".")[0]
        if not (top in STDLIB or top == "torch" or within(module, "easydistill.loss")):
            yield line, f"loss/ imports {module}"


def direction_rule(path: Path):
    importer = module_name(path)
    is_command = any(within(importer, c) for c in COMMANDS)
    for line, module, name in imports(path):
        targets = {module} | ({f"{module}.{name}"} if name else set())
        if any(within(t, "examples") for t in targets):
            yield line, f"imports {module} (examples/ is built on the library, never under it)"
        elif not is_command and any(within(t, c) for t in targets for c in COMMANDS):
            yield line, f"library module imports the command module {module}{'.' + name if name else ''}"


def private_rule(path: Path):
    importer = module_name(path)
    for line, module, name in imports(path):
        theirs = module != importer and not (is_package(path) and within(module, importer))
        if theirs and (any(is_private(part) for part in module.split(".")) or (name and is_private(name))):
            yield line, f"imports the private {module}{'.' + name if name else ''}"
    yield from ((line, f"uses the private {what}") for line, what in private_attributes(path))


def test_loss_imports_only_torch_and_the_standard_library():
    files = sorted((PACKAGE / "loss").rglob("*.py"))
    assert files, "easydistill/loss/ is missing"
    assert violations(files, loss_rule) == []


def test_the_library_imports_no_command_module_and_no_example():
    assert violations(library_files(), direction_rule) == []


def test_no_private_name_crosses_modules():
    assert violations(library_files() + sorted((ROOT / "examples").rglob("*.py")), private_rule) == []


@pytest.mark.parametrize(
    "relative, source, rule",
    [
        ("easydistill/loss/x.py", "from easydistill.models import eval_mode\n", loss_rule),
        ("easydistill/loss/x.py", "def f():\n    import numpy\n", loss_rule),
        ("easydistill/train/x.py", "from easydistill.cli import run\n", direction_rule),
        ("easydistill/train/x.py", "from easydistill import eval\n", direction_rule),
        ("easydistill/train/x.py", "from ..kd.train import main\n", direction_rule),
        ("easydistill/kd/x.py", "import examples.synthetic\n", direction_rule),
        ("easydistill/train/x.py", "from easydistill.preflight import _embedding_rows\n", private_rule),
        ("easydistill/train/x.py", "from easydistill import preflight\npreflight._rows()\n", private_rule),
    ],
)
def test_each_rule_catches_a_forbidden_import(tmp_path, monkeypatch, relative, source, rule):
    """Mutation check: a file with one forbidden import, placed in the tree, is reported."""
    fake_root = tmp_path / "repo"
    target = fake_root / relative
    target.parent.mkdir(parents=True)
    target.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert list(rule(target)), f"{relative}: {source!r} passed {rule.__name__}"


def test_allowed_imports_pass(tmp_path, monkeypatch):
    fake_root = tmp_path / "repo"
    cases = [
        (
            "easydistill/loss/x.py",
            "import math\nimport torch.nn.functional as F\nfrom .divergence import a\n",
            loss_rule,
        ),
        (
            "easydistill/kd/x.py",
            "from easydistill.cli import run\nfrom easydistill.kd.train import main\n",
            direction_rule,
        ),
        ("easydistill/store/x.py", "from easydistill.store.topk import StoreWriter\n", direction_rule),
        ("easydistill/data/x.py", "def _mine():\n    pass\n_mine()\n", private_rule),
    ]
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    for relative, source, rule in cases:
        target = fake_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
        assert list(rule(target)) == [], (relative, source)
