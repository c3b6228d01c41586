"""T2I-CompBench's "3-in-1" score for complex prompts (3_in_1_eval/3_in_1.py).

Per image it averages BLIP-VQA (attributes) with the 2D-spatial score and/or CLIP similarity
(actions): prompts listed as spatial -> (attribute + spatial) / 2, listed as action ->
(attribute + CLIP) / 2, otherwise all three / 3. T2I-CompBench reads these lists from
``complex_val_spatial.txt`` / ``complex_val_action.txt``; pass them as ``spatial_prompts`` and
``action_prompts`` to reproduce it. Without them a prompt counts as spatial when it contains
one of the spatial relation words, else as action. Their CLIP runs on the prompt without its
adjectives (spaCy POS tags); here it sees the whole prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric
from mitune.metrics.blip_vqa import BlipVQAMetric
from mitune.metrics.clip_score import CompBenchCLIPMetric
from mitune.metrics.spatial import SpatialMetric
from mitune.prompts.phrases import parse_spatial


def _key(prompt: str) -> str:
    """T2I-CompBench matches prompts by the text before the first '.', lower-cased."""
    return prompt.strip().split(".")[0].lower()


def combine(attribute: float, spatial: float | None, action: float | None) -> float:
    """Mean of the scores that apply to the prompt (None: not part of it)."""
    parts = [s for s in (attribute, spatial, action) if s is not None]
    return sum(parts) / len(parts)


class ThreeInOneMetric(AlignmentMetric):
    """Average of BLIP-VQA, 2D-spatial and CLIP as T2I-CompBench scores its complex category."""

    name = "three_in_one"

    def __init__(self, *, blip: BlipVQAMetric | None = None, spatial: SpatialMetric | None = None,
                 clip: CompBenchCLIPMetric | None = None, spatial_prompts: Iterable[str] | None = None,
                 action_prompts: Iterable[str] | None = None, device: str = "cpu", batch_size: int = 8,
                 progress: bool = True) -> None:
        super().__init__(batch_size=batch_size, progress=progress)
        self.blip = blip or BlipVQAMetric(device=device, progress=False)
        self.spatial = spatial or SpatialMetric(device=device, progress=False)
        self.clip = clip or CompBenchCLIPMetric(device=device, progress=False)
        self.spatial_prompts = {_key(p) for p in spatial_prompts} if spatial_prompts is not None else None
        self.action_prompts = {_key(p) for p in action_prompts} if action_prompts is not None else None

    def kinds(self, prompt: str) -> tuple[bool, bool]:
        """(has a spatial part, has an action part) of a complex prompt."""
        if self.spatial_prompts is None or self.action_prompts is None:
            spatial = parse_spatial(prompt, self.spatial.use_spacy) is not None
            return spatial, not spatial
        key = _key(prompt)
        if key in self.spatial_prompts:
            return True, False
        if key in self.action_prompts:
            return False, True
        return True, True

    def check_prompts(self, prompts) -> None:
        self.spatial.check_prompts([p for p in prompts if self.kinds(p)[0]])

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        kinds = [self.kinds(p) for p in prompts]
        attribute = self.blip.score_batch(images, prompts).tolist()
        spatial_idx = [i for i, (s, _) in enumerate(kinds) if s]
        action_idx = [i for i, (_, a) in enumerate(kinds) if a]
        spatial = self._subset(self.spatial, images, prompts, spatial_idx)
        action = self._subset(self.clip, images, prompts, action_idx)
        return torch.tensor([combine(attribute[i], spatial.get(i), action.get(i)) for i in range(len(prompts))],
                            dtype=torch.float64)

    @staticmethod
    def _subset(metric: AlignmentMetric, images: list[Image.Image], prompts: list[str],
                index: list[int]) -> dict[int, float]:
        if not index:
            return {}
        scores = metric.score_batch([images[i] for i in index], [prompts[i] for i in index])
        return dict(zip(index, scores.tolist()))
