"""The layer rule of README's Layout, as a test: no module imports a higher layer, no method imports another.

An ast walk over ``src/magicstudio`` (every import statement, also inside functions and ``TYPE_CHECKING`` blocks,
relative ones resolved against the importing module) so the rule cannot quietly erode.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "magicstudio"

#: low to high; a module may import its own layer and the layers before it
LAYERS = ["root", "data", "models", "postprocess", "attention", "losses", "training", "methods", "evaluation",
          "experiments", "cli", "ui", "__main__"]  # __main__: `python -m magicstudio`, the entry point above all
ROOT_MODULES = {"errors", "io", "hub", "compat", "allocator", "__init__"}


def layer_of(parts: tuple[str, ...]) -> str:
    """``("magicstudio", "methods", "baselines", "common")`` -> ``"methods"``."""
    if len(parts) < 2 or parts[1] in ROOT_MODULES:
        return "root"
    if parts[1] not in LAYERS:
        raise AssertionError(f"magicstudio.{parts[1]} is in no layer: add it to LAYERS in tests/test_layers.py")
    return parts[1]


def method_of(parts: tuple[str, ...]) -> str | None:
    return parts[2] if len(parts) > 2 and parts[1] == "methods" and parts[2] != "__init__" else None


def module_parts(path: Path, root: Path = ROOT) -> tuple[tuple[str, ...], bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = tuple(rel.parts)
    return (parts[:-1], True) if parts[-1] == "__init__" else (parts, False)


def imports(path: Path, root: Path = ROOT):
    """(line, absolute target parts) of every magicstudio import in ``path``."""
    mod, is_pkg = module_parts(path, root)
    package = mod if is_pkg else mod[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "magicstudio":
                    yield node.lineno, tuple(a.name.split("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (tuple(node.module.split(".")) if node.module else ())
            elif node.module and node.module.split(".")[0] == "magicstudio":
                target = tuple(node.module.split("."))
            else:
                continue
            for a in node.names:  # ``from .. import methods`` imports a package: count the name's own layer
                sub = target + (a.name,)
                spec_path = root.parent.joinpath(*sub)
                yield node.lineno, sub if (spec_path.is_dir() or spec_path.with_suffix(".py").is_file()) else target


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        mod, _ = module_parts(path, root)
        here, here_method = LAYERS.index(layer_of(mod)), method_of(mod)
        for line, target in imports(path, root):
            there = LAYERS.index(layer_of(target))
            where = f"{path.relative_to(root.parent)}:{line} imports {'.'.join(target)}"
            if there > here:
                found.append(f"{where} ({LAYERS[here]} -> higher layer {LAYERS[there]})")
            elif here_method and method_of(target) and method_of(target) != here_method:
                found.append(f"{where} (method {here_method} -> method {method_of(target)})")
    return found


def test_no_upward_or_cross_method_imports():
    assert violations() == []


def test_every_magicstudio_import_names_a_real_module():
    """Also catches stale paths after a move (an import inside a function fails only when it runs)."""
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        for line, target in imports(path):
            if importlib.util.find_spec(".".join(target)) is None:
                missing.append(f"{path.relative_to(ROOT.parent)}:{line} imports {'.'.join(target)}")
    assert missing == []


@pytest.mark.parametrize("file,code,why", [
    ("magicstudio/methods/x.py", "def f():\n    from ..evaluation import metrics\n", "higher layer evaluation"),
    ("magicstudio/training/x.py", "from magicstudio.methods.magicapture import config\n", "higher layer methods"),
    ("magicstudio/methods/baselines/x.py", "from ..magicapture import config\n", "method baselines -> method magicapture"),
    ("magicstudio/data/x.py", "import magicstudio.cli.main\n", "higher layer cli"),
])
def test_the_walk_catches_an_injected_import(tmp_path, file, code, why):
    root = tmp_path / "magicstudio"
    for d in ("methods/magicapture", "methods/baselines", "training", "evaluation", "data", "cli"):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / file.split("/", 1)[1]).write_text(code)
    assert any(why in v for v in violations(root))
