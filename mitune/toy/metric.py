"""The toy world's metrics: the exact oracle as alignment (``mitune.toy.oracle.score``) and, for diagnosis,
the number of objects drawn; ``toy_fd``, a Fréchet distance to renderer scenes of the same prompts in
the feature space of a network trained on the toy world (``mitune.toy.features``), as quality."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric, MetricInputError
from mitune.metrics.quality import FrechetDistance
from mitune.toy import oracle
from mitune.toy.features import FEATURES_DIR, ToyFeatures
from mitune.toy.world import parse, render


class ToyOracleMetric(AlignmentMetric):
    """Rule-based judge of ``mitune.toy.world`` images: exact, so it needs no model."""

    name = "toy_oracle"

    def __init__(self, batch_size: int = 64, progress: bool = True) -> None:
        super().__init__(batch_size=batch_size, progress=progress)

    def check_prompts(self, prompts) -> None:
        """Every prompt must come from the toy grammar; fail before scoring otherwise."""
        for i, prompt in enumerate(prompts):
            try:
                parse(prompt)
            except ValueError as err:
                raise MetricInputError(f"prompt {i} ({prompt!r}) is not a toy-world prompt: {err}") from err

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return torch.tensor([oracle.score_image(p, im) for im, p in zip(images, prompts)], dtype=torch.float64)


class ToyObjectCountMetric(ToyOracleMetric):
    """How many objects the oracle finds in an image, whatever the prompt asks: a diagnostic for
    ``mitune.analysis`` (does MI favour busy images?), not an alignment score."""

    name = "toy_objects"

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return torch.tensor([len(oracle.detect(oracle.pixels(im))) for im in images], dtype=torch.float64)


class ToyFD(FrechetDistance):
    """FID for the toy world: generated images against renderer scenes of the same prompts (one per
    generated image, unspecified attributes and positions drawn by the renderer), in the feature space of
    ``mitune/assets/toy-features`` (its model card says what it was trained on and why)."""

    name = "toy_fd"
    needs_reference = False

    def __init__(self, features: str | Path = FEATURES_DIR, batch_size: int = 256, progress: bool = True) -> None:
        super().__init__(ToyFeatures(features), batch_size=batch_size, progress=progress)

    def reference_for(self, prompts: Sequence[str], seed: int) -> list[Image.Image]:
        for prompt in dict.fromkeys(prompts):
            try:
                parse(prompt)
            except ValueError as err:
                raise MetricInputError(f"toy_fd: prompt {prompt!r} is not a toy-world prompt: {err}") from err
        return [Image.fromarray(render(parse(p), 32, np.random.default_rng([seed, i]))) for i, p in enumerate(prompts)]
