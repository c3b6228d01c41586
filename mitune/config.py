"""Typed settings: each config group checked against its dataclass before anything expensive runs.

OmegaConf's structured-config validation checks every value's type against the dataclass's
annotations (``rounds=1.5`` or ``generation.num_candidates=abc`` fail naming the key); the
dataclass's ``__post_init__`` then checks ranges, and ``finite`` rejects NaN and inf, which
are valid floats to OmegaConf.

``register`` makes ``conf/`` composable: the settings' defaults as config nodes and the
``${mitune.*}`` resolvers. Anything that composes ``conf/`` (the entry points, tests) calls it first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mitune import ASSETS
from mitune.models.adapters import AdapterConfig
from mitune.rounds.settings import GenerationConfig, TrainConfig
from mitune.runs.tracking import job_dirname, run_name, sweep_group

T = TypeVar("T")


@dataclass
class RunSettings:
    """The top-level keys of ``conf/config.yaml`` that the task reads as numbers."""

    rounds: int
    seed: int

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


def without_targets(node: Any) -> Any:
    """A plain copy without Hydra's ``_target_`` keys, which the dataclasses do not declare."""
    if isinstance(node, dict):
        return {k: without_targets(v) for k, v in node.items() if k != "_target_"}
    return node


def dataclass_node(schema: type) -> dict[str, Any]:
    """The dataclass's defaults as a plain config node, with the ``_target_`` that builds it
    (nested dataclasses too, for ``hydra.utils.instantiate``).

    A plain node, not a structured one: Hydra would reject the ``_target_`` keys on a node typed
    by the dataclass, and frozen dataclasses give read-only nodes. ``typed`` checks the types.
    """
    node: dict[str, Any] = {"_target_": f"{schema.__module__}.{schema.__qualname__}"}
    defaults = schema()
    for f in fields(schema):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            value = dataclass_node(type(value))
        node[f.name] = list(value) if isinstance(value, tuple) else value
    return node


SCHEMAS: dict[str, type] = {"generation": GenerationConfig, "train": TrainConfig, "adapter": AdapterConfig}


def register() -> None:
    """What ``conf/`` needs before Hydra composes it: each settings dataclass's defaults as
    ``<group>/dataclass`` (``conf/<group>/paper.yaml`` extends it, so the paper's numbers are written
    once, as the dataclass defaults) and the ``${mitune.*}`` resolvers. Called by the tasks that
    compose ``conf/`` (at import, as ``@hydra.main`` composes before the task runs) and by tests."""
    for group, schema in SCHEMAS.items():
        ConfigStore.instance().store(group=group, name="dataclass", node=dataclass_node(schema))
    # `${mitune.asset:toy-model}`: a file shipped with the package, wherever it is installed.
    OmegaConf.register_new_resolver("mitune.asset", lambda name: str(ASSETS / name), replace=True)
    # Sweep job dirs, W&B run names and groups (mitune.runs.tracking): `${mitune.job_dirname:}`,
    # `${mitune.run_name:${task_name}}`, `${mitune.sweep_group:}`.
    OmegaConf.register_new_resolver("mitune.job_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("mitune.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("mitune.sweep_group", sweep_group, replace=True)


def finite(settings: Any, key: str) -> None:
    for f in fields(settings):
        value, name = getattr(settings, f.name), f"{key}.{f.name}" if key else f.name
        if is_dataclass(value):
            finite(value, name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"{name} must be a finite number, got {value}")


def writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses give read-only nodes at every level; the merge must write (the built
    dataclass instance is still frozen)."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        if isinstance(node._get_node(key), DictConfig):
            writable(node[key])
    return node


def typed(node: DictConfig, schema: type[T], key: str = "") -> T:
    """The config group ``key`` as a ``schema`` instance, or a ValueError naming the bad key."""
    data = without_targets(OmegaConf.to_container(node, resolve=True))
    try:
        settings = OmegaConf.to_object(OmegaConf.merge(writable(OmegaConf.structured(schema)), data))
    except OmegaConfBaseException as err:
        full = f"{key}.{err.full_key}" if key else err.full_key
        raise ValueError(f"config key {full}: {err.msg}") from None
    finite(settings, key)
    return settings
