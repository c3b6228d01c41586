from __future__ import annotations

import pytest
import torch

from mitune.selection import rank_by_score, select_top_k


def test_top_k_picks_highest_scores():
    scores = torch.tensor([0.3, 2.0, -1.0, 0.9, 2.0])
    ranks, selected = select_top_k(scores, 2)
    # ties go to the lower index: candidate 1 before candidate 4
    assert ranks.tolist() == [4, 1, 5, 3, 2]
    assert selected.tolist() == [False, True, False, False, True]


def test_ranks_are_a_permutation():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(0))
    ranks = rank_by_score(scores)
    assert sorted(ranks.tolist()) == list(range(1, 51))
    assert scores[ranks == 1].item() == scores.max().item()


@pytest.mark.parametrize("m,k,msg", [(3, 4, r"top_k must be in \[1, M=3\], got 4"), (3, 0, "got 0"), (0, 1, "M\\) must be >= 1, got 0")])
def test_bad_k_or_m(m, k, msg):
    with pytest.raises(ValueError, match=msg):
        select_top_k(torch.zeros(m), k)
