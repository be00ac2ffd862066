"""The package's shape a user relies on when editing it: imports go one way, and there are no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "image_finetune"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every ``image_finetune`` module a file imports, wherever the import stands (``TYPE_CHECKING`` blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("image_finetune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("image_finetune"))
    return found


def in_package(module: str, package: str) -> bool:
    """``image_finetune.data.scan`` is in ``image_finetune.data``; ``image_finetune.inference.data_issues`` is not."""
    return module == package or module.startswith(package + ".")


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {m: {d for d in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
#: The top layer: the module each entry script (train.py, eval.py, ...) hands its config to. The small helpers the
#: scripts also import (cli, config_checks, multirun) are leaves below everything.
HELPERS = {"image_finetune.core.cli", "image_finetune.core.config_checks", "image_finetune.ops.multirun"}
ENTRY = {d for script in REPO.glob("*.py") for d in imports(script) if d in GRAPH} - HELPERS


def test_the_package_has_no_import_circles():
    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(GRAPH[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH[m])
        return seen

    # a package's __init__ importing its own modules is not a circle in behaviour, but a module importing its
    # package's __init__ that imports it back is: count both.
    circles = sorted(m for m in GRAPH if m in reachable(m))
    assert circles == []


def test_entry_modules_import_only_downward():
    assert {
        "image_finetune.training.train",
        "image_finetune.inference.evaluate",
        "image_finetune.inference.predict",
        "image_finetune.inference.export",
    } <= ENTRY
    sideways = {m: sorted(GRAPH[m] & ENTRY) for m in ENTRY if GRAPH[m] & ENTRY}
    assert sideways == {}


@pytest.mark.parametrize("layer", ["recipe", "models", "data", "callbacks"])
def test_building_blocks_never_import_the_layers_above(layer):
    above = ENTRY | {"image_finetune.core.cli"}
    offenders = {
        m: sorted(GRAPH[m] & above) for m in GRAPH if in_package(m, f"image_finetune.{layer}") and GRAPH[m] & above
    }
    assert offenders == {}


def test_the_recipe_reads_only_the_seams_of_the_engine():
    """What a person edits depends on the small types it builds (``Backbone``, ``Preprocessing``, stages, the data
    module base) and on errors, never on the training, inference, checkpoint or operations machinery."""
    engine = ("training", "inference", "ops", "callbacks", "checkpoints")
    offenders = {
        m: sorted(d for d in GRAPH[m] if d.split(".")[1] in engine)
        for m in GRAPH
        if m.startswith("image_finetune.recipe") and any(d.split(".")[1] in engine for d in GRAPH[m])
    }
    assert offenders == {}


def test_every_recipe_file_says_what_to_edit_in_it():
    for path in (PACKAGE / "recipe").glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "edit" in doc.lower() or "add your" in doc.lower(), path.name


def test_drawing_lives_in_one_module():
    """Grids, the confusion matrix and the LR finder's curves are drawn by `plots` only (matplotlib is imported there)."""

    def draws(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "matplotlib" or name.startswith("matplotlib.") for name in names):
                return True
        return False

    assert sorted(module_name(p) for p in PACKAGE.rglob("*.py") if draws(p)) == ["image_finetune.core.plots"]
