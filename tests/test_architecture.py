"""Imports go downwards only (docs/architecture.md): checked on the source and in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mitune"
TASKS = {"mitune.run", "mitune.evaluate", "mitune.summary", "mitune.analysis", "mitune.cli", "mitune.__main__"}
# Modules the toy world must stay out of, and that must not reach into generation.
CORE = {"mitune.rounds.selection", "mitune.rounds.data", "mitune.metrics.mi", "mitune.rounds.generation", "mitune.rounds.module",
        "mitune.rounds.callbacks", "mitune.metrics"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``mitune`` module a source file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("mitune")}


SOURCES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(set(SOURCES) - TASKS))
def test_no_module_below_the_tasks_imports_a_task(module):
    assert not {name for name in SOURCES[module] if name in TASKS}


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_does_not_import_the_toy_world(module):
    assert not {name for name in SOURCES[module] if name.startswith("mitune.toy")}


@pytest.mark.parametrize("module", ["mitune.rounds.selection", "mitune.rounds.data", "mitune.metrics.mi"])
def test_the_training_set_selection_and_mi_metric_do_not_import_generation(module):
    assert "mitune.rounds.generation" not in SOURCES[module]


def loaded_after(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    return set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout))


def test_importing_evaluate_does_not_load_the_training_stack():
    loaded = loaded_after("mitune.evaluate")
    assert not loaded & {"mitune.run", "mitune.rounds.callbacks", "mitune.rounds.module", "mitune.summary", "lightning.pytorch"}


def test_selection_data_and_the_mi_metric_load_neither_the_toy_world_nor_generation():
    loaded = loaded_after("mitune.rounds.selection, mitune.rounds.data, mitune.metrics.mi")
    assert not {name for name in loaded if name.startswith("mitune.toy") or name == "mitune.rounds.generation"}
