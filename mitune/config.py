"""Typed settings: each config group checked against its dataclass before anything expensive runs.

OmegaConf's structured-config validation checks every value's type against the dataclass's
annotations (``rounds=1.5`` or ``generation.num_candidates=abc`` fail naming the key); the
dataclass's ``__post_init__`` then checks ranges, and ``finite`` rejects NaN and inf, which
are valid floats to OmegaConf.

``TrainConfig`` lives here rather than in ``mitune.training`` so that evaluation can compose the
training config without loading the training stack.

Importing this module also registers each settings dataclass's defaults with Hydra's ConfigStore as
``<group>/dataclass`` (generation, train, adapter): ``conf/<group>/paper.yaml`` extends that node, so
the paper's numbers are written only once, as the dataclass defaults. Anything that composes
``conf/`` (the entry points, tests) imports this module first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mitune.adapters import AdapterConfig
from mitune.generation import GenerationConfig

T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the paper's (Table 8): AdamW lr 1e-4, betas
    (0.9, 0.999), weight decay 1e-2, eps 1e-8, constant LR, batch 400, 300 iterations per round,
    t ~ U(500, 1000). They are written only here: ``conf/train/paper.yaml`` composes them (see
    ``mitune.config``); the gradient clipping (norm 1.0) is the Lightning Trainer's, in
    ``conf/trainer/default.yaml``. Gradient accumulation is derived:
    effective_batch = micro_batch x accumulation x devices (must divide exactly).
    """

    effective_batch: int = 400
    micro_batch: int = 8
    steps_per_round: int = 300
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    t_min: int = 500
    t_max: int = 1000
    # diffusers' `proportion_empty_prompts`: the share of samples trained on the empty prompt, so the
    # unconditional branch that CFG subtracts learns the round's images too. The paper: 0.
    empty_prompt_prob: float = 0.0
    train_text_encoder: bool = False
    # DoRA's weight norm once per optimizer step instead of per micro-batch: exact, and faster with
    # gradient accumulation (DoraNormCache, docs/benchmarks/training_cpu.md).
    cache_dora_norm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("effective_batch", "micro_batch", "steps_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"train.t_min/t_max must satisfy 0 <= t_min < t_max, got {self.t_min}, {self.t_max}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.empty_prompt_prob < 1:
            raise ValueError(f"train.empty_prompt_prob must be in [0, 1), got {self.empty_prompt_prob}")


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
for group, schema in SCHEMAS.items():
    ConfigStore.instance().store(group=group, name="dataclass", node=dataclass_node(schema))


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
