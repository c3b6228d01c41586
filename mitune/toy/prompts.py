"""Toy-world prompt sets (``conf/data/toy.yaml``): balanced over the categories, named like T2I-CompBench's splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mitune.prompts.sources import PromptSet, clean_prompts
from mitune.toy.world import balanced_prompts, category_of

TOY_SPLITS = {"train": "train", "val": "test"}
"""Toy splits named like T2I-CompBench's: ``val`` holds the held-out bindings."""


def load_toy(split: str = "train", per_category: int = 8, split_seed: int = 0, limit: int | None = None,
             skip: int = 0, categories: Sequence[str] | None = None) -> PromptSet:
    """Toy-world prompts (``mitune.toy.world``), the same number from each category (``categories``: these
    only), after the first ``skip`` of each: ``split=train, skip=n`` is an in-distribution test set for a run
    trained on ``n``."""
    if split not in TOY_SPLITS:
        raise ValueError(f"unknown toy split {split!r}; expected one of {tuple(TOY_SPLITS)}")
    prompts = balanced_prompts(TOY_SPLITS[split], per_category, split_seed, skip,
                               None if categories is None else list(categories))
    cleaned = clean_prompts(prompts, f"toy world {split} (split seed {split_seed})", limit)
    return replace(cleaned, categories=[category_of(p) for p in cleaned.prompts])
