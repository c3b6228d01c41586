"""Seeds derived from several values, shared by generation, the fine-tuning set and MI scoring."""

from __future__ import annotations

import hashlib


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values, so nearby inputs give unrelated streams."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
