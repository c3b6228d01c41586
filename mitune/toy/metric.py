"""The toy world's exact oracle as metrics: alignment (``mitune.toy.oracle.score``) and, for diagnosis,
the number of objects drawn."""

from __future__ import annotations

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric, MetricInputError
from mitune.toy import oracle
from mitune.toy.world import parse


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
