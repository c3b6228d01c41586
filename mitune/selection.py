"""Top-k selection of a prompt's candidates (Algorithm 1, line 4).

``mi`` is MI-TUNE. ``phrase_mi`` ranks by the smallest per-phrase conditional MI
(``mitune.phrase_mi``): an image that neglects one phrase of the prompt ranks low even when the
rest of it carries much MI. ``random`` and ``oracle`` are the controls of the toy experiment: the
same pipeline with selection by chance, or by the toy world's exact judge (an upper bound,
like the paper's HPS-selected row).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

STRATEGIES = ("mi", "random", "oracle", "phrase_mi")


def check_top_k(num_candidates: int, k: int) -> None:
    if num_candidates < 1:
        raise ValueError(f"num_candidates (M) must be >= 1, got {num_candidates}")
    if not 1 <= k <= num_candidates:
        raise ValueError(f"top_k must be in [1, M={num_candidates}], got {k}")


def check_strategy(strategy: str, prompts: Sequence[str] = ()) -> None:
    """Unknown strategies, prompts the oracle cannot judge and prompts without a phrase (for
    ``phrase_mi``) fail before any generation."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "phrase_mi":
        from mitune.phrase_mi import prompt_phrases

        for prompt in prompts:
            prompt_phrases(prompt)  # names the prompt that has no phrase to score
    if strategy == "oracle":
        from mitune.toy.world import parse

        for prompt in prompts:
            try:
                parse(prompt)
            except ValueError as err:
                raise ValueError(f"selection=oracle judges toy-world prompts only: {err}") from None


def selection_scores(strategy: str, prompt: str, images: Sequence[Image.Image], mi: torch.Tensor,
                     generator: torch.Generator, phrase_mi: torch.Tensor | None = None) -> torch.Tensor:
    """The score a strategy ranks one prompt's candidates by (higher is better); ``phrase_mi``
    is each candidate's smallest per-phrase MI, needed by the ``phrase_mi`` strategy."""
    check_strategy(strategy)
    if strategy == "mi":
        return mi
    if strategy == "phrase_mi":
        if phrase_mi is None:
            raise ValueError("selection=phrase_mi needs each candidate's phrase MI")
        return phrase_mi
    if strategy == "random":
        return torch.rand(len(mi), generator=generator, dtype=torch.float64)
    from mitune.toy.oracle import score

    return torch.tensor([score(prompt, np.asarray(image.convert("RGB"))) for image in images], dtype=torch.float64)


def rank_by_score(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks, highest score first; ties go to the lower candidate index (stable)."""
    order = torch.sort(-scores.double(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1)
    return ranks


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks and a boolean mask of the k best candidates of one prompt."""
    check_top_k(len(scores), k)
    ranks = rank_by_score(scores)
    return ranks, ranks <= k
