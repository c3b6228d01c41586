"""Seeds derived from several values, shared by generation, selection, the fine-tuning set and MI scoring."""

from __future__ import annotations

import hashlib


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values, so nearby inputs give unrelated streams."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def candidate_seed(base_seed: int, prompt: str, candidate: int, mode: str = "per_prompt") -> int:
    """Seed of one candidate: stable across runs, prompt order and M.

    ``shared`` gives every prompt the same M seeds, as the authors' public code does.
    """
    if mode == "shared":
        return base_seed + candidate
    return mix_seed(base_seed, candidate, prompt)
