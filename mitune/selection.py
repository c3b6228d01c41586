"""Top-k selection of a prompt's candidates (Algorithm 1, line 4)."""

from __future__ import annotations

import torch


def check_top_k(num_candidates: int, k: int) -> None:
    if num_candidates < 1:
        raise ValueError(f"num_candidates (M) must be >= 1, got {num_candidates}")
    if not 1 <= k <= num_candidates:
        raise ValueError(f"top_k must be in [1, M={num_candidates}], got {k}")


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
