"""The package's layers and import rules (docs/architecture.md), checked on the source and in a fresh interpreter.

Bottom to top: ``runs`` (the run dir's conventions) < ``prompts`` < ``mi`` (the MI library) < ``models`` <
``metrics`` < ``toy`` < ``rounds`` (Algorithm 1) < the top-level modules (the tasks and their helpers).
A module imports its own layer and the layers below it, never above.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mitune"
TASKS = {"mitune.run", "mitune.evaluate", "mitune.summary", "mitune.analysis", "mitune.cli", "mitune.rerank"}
LAYERS = ["mitune.runs", "mitune.prompts", "mitune.mi", "mitune.models", "mitune.metrics", "mitune.toy", "mitune.rounds"]
# Lightning's trainer, callbacks and loggers: the round loop, and the run dir's Lightning plugins (checkpoint
# files, the CSV logger, the SIGTERM stop).
LIGHTNING = {"mitune.runs.checkpoints", "mitune.runs.loggers", "mitune.runs.preemption"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


SOURCES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def mitune_imports(module: str) -> set[str]:
    return {name for name in SOURCES[module] if name.startswith("mitune.") or name == "mitune"}


def layer(module: str) -> int:
    """The module's layer: its sub-package's index in LAYERS, or above them all (a top-level module)."""
    return next((i for i, pkg in enumerate(LAYERS) if module == pkg or module.startswith(pkg + ".")), len(LAYERS))


def under(names: set[str], *packages: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in packages)}


def test_the_top_level_holds_at_most_14_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_go_down_only(module):
    """Within a layer anything goes; across layers only downwards. ``from mitune import ASSETS`` names the package's files."""
    assert not {name for name in mitune_imports(module) - {"mitune", "mitune.ASSETS"} if layer(name) > layer(module)}


@pytest.mark.parametrize("module", sorted(set(SOURCES) - TASKS))
def test_no_module_below_the_tasks_imports_a_task(module):
    assert not mitune_imports(module) & TASKS


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if m.startswith("mitune.mi")))
def test_the_mi_library_imports_no_lightning_hydra_run_dir_code_or_metrics(module):
    names = SOURCES[module]
    assert not under(names, "lightning", "hydra", "omegaconf", "mitune.runs", "mitune.metrics", "mitune.rounds",
                     "mitune.models", "mitune.toy")
    assert all(name.startswith("mitune.prompts.phrases") for name in under(names, "mitune.prompts"))


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_lightning_is_imported_by_the_round_loop_and_the_run_dirs_plugins_only(module):
    if under(SOURCES[module], "lightning"):
        assert module.startswith("mitune.rounds.") or module in LIGHTNING


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if m.startswith("mitune.rounds.")))
def test_algorithm_1_does_not_import_the_toy_world(module):
    """A selection strategy that needs a judge names a metric of the registry (``toy_oracle``)."""
    assert not under(mitune_imports(module), "mitune.toy")


def test_the_module_that_writes_a_generation_round_does_not_import_selection():
    assert not under(mitune_imports("mitune.rounds.generation"), "mitune.rounds.selection", "mitune.metrics")


def test_the_package_root_imports_nothing_of_its_own():
    assert not mitune_imports("mitune") and not under(SOURCES["mitune"], "omegaconf", "hydra")


def loaded_after(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    return set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout))


def test_importing_the_mi_library_loads_no_lightning_hydra_run_dir_code_or_metrics():
    loaded = loaded_after("mitune.mi")
    assert not under(loaded, "lightning", "hydra", "omegaconf", "mitune.runs", "mitune.metrics", "mitune.rounds")


def test_importing_mitune_has_no_side_effects():
    assert not under(loaded_after("mitune"), "omegaconf", "hydra", "torch") - {"mitune"}


def test_importing_evaluate_does_not_load_the_training_stack():
    loaded = loaded_after("mitune.evaluate")
    assert not loaded & {"mitune.run", "mitune.rounds.loop", "mitune.rounds.module", "mitune.rounds.data",
                         "mitune.rounds.selection", "mitune.summary", "lightning.pytorch"}


def test_generation_loads_neither_selection_nor_the_toy_world():
    loaded = loaded_after("mitune.rounds.generation")
    assert not under(loaded, "mitune.toy", "mitune.rounds.selection", "mitune.metrics", "lightning")
