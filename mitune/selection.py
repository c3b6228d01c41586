"""Top-k selection of a prompt's candidates (Algorithm 1, line 4), by any score.

``mi`` is MI-TUNE: the point-wise MI accumulated while sampling (free). ``phrase_mi`` ranks by
the smallest per-phrase conditional MI (``mitune.phrase_mi``), also from sampling: an image that
neglects one phrase of the prompt ranks low even when the rest of it carries much MI. ``random``
selects by chance (the control). Any other name is an alignment metric of the registry
(``mitune.metrics``) scoring the decoded candidates, e.g. ``toy_oracle``, the toy world's exact
judge (an upper bound, like the paper's HPS-selected row), or ``clip_score``.
"""

from __future__ import annotations

from functools import cache
from typing import Sequence

import torch
from PIL import Image

from mitune.metrics import ALIGNMENT_METRICS, AlignmentMetric, build_alignment_metric

SAMPLED = ("mi", "phrase_mi", "random")
STRATEGIES = SAMPLED + tuple(name for name in ALIGNMENT_METRICS if name not in SAMPLED)


def check_top_k(num_candidates: int, k: int) -> None:
    if num_candidates < 1:
        raise ValueError(f"num_candidates (M) must be >= 1, got {num_candidates}")
    if not 1 <= k <= num_candidates:
        raise ValueError(f"top_k must be in [1, M={num_candidates}], got {k}")


@cache
def selection_metric(name: str) -> AlignmentMetric:
    """The registry metric a strategy ranks by, built once per process."""
    return build_alignment_metric(name, progress=False)


def check_strategy(strategy: str, prompts: Sequence[str] = ()) -> None:
    """Unknown strategies, prompts without a phrase (``phrase_mi``) and prompts the selecting metric
    cannot score fail before any generation."""
    if strategy not in STRATEGIES:
        raise ValueError(f"selection must be one of {STRATEGIES}, got {strategy!r}")
    if not prompts:
        return
    if strategy == "phrase_mi":
        from mitune.phrase_mi import prompt_phrases

        for prompt in prompts:
            prompt_phrases(prompt)  # names the prompt that has no phrase to score
    elif strategy not in SAMPLED:
        try:
            selection_metric(strategy).check_prompts(list(prompts))
        except ValueError as err:
            raise ValueError(f"selection={strategy}: {err}") from None


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
    return selection_metric(strategy).score(list(images), [prompt] * len(images)).double()


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
