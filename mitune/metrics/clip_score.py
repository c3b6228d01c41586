"""CLIPScore (Hessel et al., 2021, torchmetrics' convention) and T2I-CompBench's CLIP similarity.

Per-image scores are computed here with transformers' CLIPModel: torchmetrics' ``CLIPScore``
only returns the mean over everything it has seen, and its functional form accepts local
models only as a loader callable. The formula is torchmetrics' (``100 * max(cos, 0)``); the
tests check it against ``torchmetrics.functional.multimodal.clip_score`` on the same model.
"""

from __future__ import annotations

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric
from mitune.metrics.clip import CLIPEmbedder


class CLIPScoreMetric(AlignmentMetric):
    """``scale * cos(image, text)``, clamped at 0 when ``clamp`` (torchmetrics: scale 100, clamp)."""

    name = "clip_score"

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", *, device: str = "cpu",
                 scale: float = 100.0, clamp: bool = True, batch_size: int = 32, progress: bool = True,
                 openai_preprocess: bool = False) -> None:
        super().__init__(batch_size=batch_size, progress=progress)
        self.embedder = CLIPEmbedder(model_name_or_path, device=device, openai_preprocess=openai_preprocess)
        self.scale = scale
        self.clamp = clamp

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        score = self.scale * self.embedder.cosine(images, prompts).double()
        return score.clamp(min=0) if self.clamp else score


class CompBenchCLIPMetric(CLIPScoreMetric):
    """T2I-CompBench's non-spatial metric: plain cosine with OpenAI CLIP ViT-B/32 (no x100, no clamp),
    with OpenAI CLIP's own image preprocessing (``openai_clip_pixels``) as their CLIPScore_eval uses."""

    name = "compbench_clip"

    def __init__(self, model_name_or_path: str = "openai/clip-vit-base-patch32", *, device: str = "cpu",
                 batch_size: int = 32, progress: bool = True) -> None:
        super().__init__(model_name_or_path, device=device, scale=1.0, clamp=False,
                         batch_size=batch_size, progress=progress, openai_preprocess=True)
