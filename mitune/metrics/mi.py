"""MI-TUNE's own signal as an evaluation metric: standalone point-wise MI of finished images.

Images are encoded with the pipeline's VAE (the posterior mean, so encoding is deterministic)
at the pipeline's default size, and ``mitune.mi.pointwise_mi`` averages ``n_draws`` draws of
(t, noise) with the pipeline's own denoiser. Each (image, prompt) pair gets its own generator
seeded from ``seed``, the prompt and the image's pixels, so a score does not depend on the
batch or on the other images.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property, partial

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from mitune.metrics.base import AlignmentMetric, MetricInputError, batches
from mitune.mi.estimators import PAPER, EpsFn, MIConfig, pointwise_mi
from mitune.mi.pipeline import ddpm_scheduler, encode_images, encode_prompts, null_embedding, unet_eps_fn
from mitune.models.loading import check_model_source, load_pipeline
from mitune.runs.seeds import mix_seed


def image_digest(image: Image.Image) -> str:
    """Content hash of the RGB pixels and size (the seed must not depend on file names)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


class MIMetric(AlignmentMetric):
    """Point-wise MI I(image; prompt) under the scoring pipeline (higher: the prompt matters more)."""

    name = "mi"

    def __init__(self, pipeline: DiffusionPipeline | str | os.PathLike, *, n_draws: int = 32, seed: int = 0,
                 config: MIConfig | dict = PAPER, torch_dtype: str | torch.dtype = torch.float32, device: str = "cpu",
                 batch_size: int = 8, progress: bool = True) -> None:
        super().__init__(batch_size=batch_size, progress=progress)
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        if isinstance(pipeline, (str, os.PathLike)):
            check_model_source(str(pipeline))  # a wrong path fails before an evaluation generates its images
            self._load = partial(load_pipeline, str(pipeline), torch_dtype=torch_dtype, device=device)
        else:
            self.pipe = pipeline
        # A dict (e.g. from a Hydra config) holds MIConfig's fields.
        self.config = config if isinstance(config, MIConfig) else MIConfig(**config)
        self.n_draws, self.seed = n_draws, seed

    @cached_property
    def pipe(self) -> DiffusionPipeline:
        """Loaded at the first score, once an evaluation's own pipeline is gone: one full-size model in
        memory at a time (two SDXL copies would not fit where one does)."""
        return self._load()

    @cached_property
    def scheduler(self) -> DDPMScheduler:
        return ddpm_scheduler(self.pipe)

    @cached_property
    def eps_fn(self) -> EpsFn:
        return unet_eps_fn(self.pipe)

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """Scaled VAE latents (posterior mode) at the pipeline's default size, as the UNet sees them."""
        return encode_images(self.pipe, images)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        seeds = [mix_seed(self.seed, prompt, image_digest(image)) for image, prompt in zip(images, prompts)]
        return self._mi(self.encode(images), prompts, seeds)

    def score_latents(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """MI of already-encoded (scaled) latents [N, C, h, w], e.g. a round's saved latents."""
        if latents.ndim != 4 or latents.shape[0] != len(prompts) or not prompts:
            raise MetricInputError(f"need latents [N, C, h, w] with N = {len(prompts)} prompts, got {tuple(latents.shape)}")
        parts = []
        for part in tqdm(batches(len(prompts), self.batch_size), desc=self.name, disable=not self.progress):
            batch, batch_prompts = latents[part].float(), list(prompts[part])
            seeds = [mix_seed(self.seed, p, hashlib.sha256(z.cpu().numpy().tobytes()).hexdigest())
                     for p, z in zip(batch_prompts, batch)]
            parts.append(self._mi(batch, batch_prompts, seeds))
        return torch.cat(parts)

    def _mi(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        device = self.pipe.unet.device
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        mi = pointwise_mi(
            self.eps_fn, latents.to(device), encode_prompts(self.pipe, prompts), null_embedding(self.pipe, len(prompts)),
            self.scheduler, n_draws=self.n_draws, generator=generators, config=self.config,
        )
        return mi.double().cpu()
