"""Experiment-tracking setup shared by training, evaluation and the summaries.

Imports nothing but the standard library, so light entry points (``mitune.summary``) can use it
without pulling in Lightning or Hydra.
"""

from __future__ import annotations

import os


def wandb_offline_without_key() -> None:
    """Run W&B offline unless credentials are configured, so a machine without a W&B account
    logs locally instead of stopping at a login prompt; an explicit ``WANDB_MODE`` always wins."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
