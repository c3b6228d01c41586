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
import random
import re
from collections.abc import Sequence
from functools import cached_property, partial

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from mitune.metrics.base import AlignmentMetric, MetricInputError, batches
from mitune.mi.estimators import CONTRAST_ESTIMATORS, PAPER, TIMESTEP_SAMPLING, EpsFn, MIConfig, contrastive_mi, pointwise_mi
from mitune.mi.pipeline import ddpm_scheduler, encode_images, encode_prompts, null_embedding, unet_eps_fn
from mitune.models.loading import check_model_source, load_pipeline
from mitune.runs.seeds import mix_seed


def image_digest(image: Image.Image) -> str:
    """Content hash of the RGB pixels and size (the seed must not depend on file names)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def missing_pipeline(name: str) -> DiffusionPipeline:
    raise MetricInputError(f"{name} has no pipeline to score under: build it with pipeline=, or select with it in a "
                           "round (generation.selection), which scores under the round's model")


class MIMetric(AlignmentMetric):
    """Point-wise MI I(image; prompt) under the scoring pipeline (higher: the prompt matters more)."""

    name = "mi"

    def __init__(self, pipeline: DiffusionPipeline | str | os.PathLike | None, *, n_draws: int = 32, seed: int = 0,
                 config: MIConfig | dict = PAPER, torch_dtype: str | torch.dtype = torch.float32, device: str = "cpu",
                 batch_size: int = 8, progress: bool = True) -> None:
        super().__init__(batch_size=batch_size, progress=progress)
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        if pipeline is None:  # given later by use_pipeline (selection scores under the round's model)
            self._load = partial(missing_pipeline, self.name)
        elif isinstance(pipeline, (str, os.PathLike)):
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

    def use_pipeline(self, pipe: DiffusionPipeline) -> None:
        """Score under ``pipe`` from now on (selection: the round's model, as it stands when it selects)."""
        self.pipe = pipe
        for cached in ("scheduler", "eps_fn"):
            self.__dict__.pop(cached, None)

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


ATTRIBUTE_SWAPS: tuple[tuple[str, ...], ...] = (
    ("red", "green", "blue", "yellow", "purple", "cyan"),
    ("circle", "square", "triangle"),
    ("solid", "striped", "dotted"),
    ("small", "big"),
    ("on the left of", "on the right of", "on top of", "below"),
)
"""Interchangeable attribute words (T2I-CompBench's colour, shape, texture and spatial kinds): those the toy
world's grammar uses, so every toy prompt has in-vocabulary contrasts (tests check they match it)."""


def contrast_prompts(prompt: str, swaps: Sequence[Sequence[str]] = ATTRIBUTE_SWAPS) -> list[str]:
    """Every prompt that differs from ``prompt`` by one attribute: one whole-word occurrence of a ``swaps``
    group's member replaced by another member of its group; sorted, without duplicates."""
    variants = set()
    for group in swaps:
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(group, key=len, reverse=True)) + r")\b")
        for match in pattern.finditer(prompt):
            for word in group:
                if word != match.group(1):
                    variants.add(prompt[: match.start()] + word + prompt[match.end():])
    variants.discard(prompt)
    return sorted(variants)


class MIContrastMetric(MIMetric):
    """Contrastive point-wise MI: an image's MI with its prompt minus its mean MI with ``contrasts`` (K) other
    prompts, every prompt's estimate from the same (t, eps) draws (``mitune.mi.estimators.contrastive_mi``).

    Why: Eq. 2's MI grows with how much an image draws whatever the prompt says (docs/toy/README.md, "What MI
    ranks by"); a busy image has a large MI with any prompt, and what is specific to its own prompt is the
    excess. The other prompts must exist when one prompt's candidates are scored alone (selection), so they
    are derived from the prompt: its one-attribute swaps (``contrast_prompts`` with ``swaps``, by default
    ``ATTRIBUTE_SWAPS``, the toy grammar's words), K of them chosen by a generator seeded from ``seed`` and the
    prompt. A prompt with fewer than K swaps is refused before scoring; other vocabularies pass ``swaps``.

    ``estimator="likelihood"`` (the default) contrasts differences of denoising errors: an ELBO estimate of
    log p(x | p) - mean log p(x | p'), positive for an image of its prompt on the exact Gaussian-mixture
    denoiser (tests/test_metrics_mi_contrast.py). ``"standalone"`` contrasts Eq. 2's ``||eps_p - eps_null||^2``
    as MI-TUNE scores; there a wrong prompt's prediction is pulled far from what the image shows, so its MI is
    the larger and the contrast of a matching image is negative on that mixture. Scored under the pipeline it
    is given; as a selection strategy, under the round's model (``mitune.rounds.selection``).
    """

    name = "mi_contrast"
    estimator = "likelihood"

    def __init__(self, pipeline: DiffusionPipeline | str | os.PathLike | None = None, *, contrasts: int = 4,
                 swaps: Sequence[Sequence[str]] = ATTRIBUTE_SWAPS, estimator: str | None = None, n_draws: int = 16,
                 timestep_sampling: str = "uniform", **kwargs) -> None:
        super().__init__(pipeline, n_draws=n_draws, **kwargs)
        if contrasts < 1:
            raise ValueError(f"contrasts must be >= 1, got {contrasts}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        self.contrasts, self.swaps = contrasts, tuple(tuple(g) for g in swaps)
        self.timestep_sampling = timestep_sampling
        self.estimator = estimator or self.estimator
        if self.estimator not in CONTRAST_ESTIMATORS:
            raise ValueError(f"estimator must be one of {CONTRAST_ESTIMATORS}, got {self.estimator!r}")

    def others(self, prompt: str) -> list[str]:
        """The K contrast prompts of ``prompt``: fixed by ``seed`` and the prompt alone."""
        variants = contrast_prompts(prompt, self.swaps)
        if len(variants) < self.contrasts:
            raise MetricInputError(f"{self.name}: prompt {prompt!r} has {len(variants)} one-attribute swaps, "
                                   f"fewer than contrasts={self.contrasts}")
        return random.Random(mix_seed(self.seed, "contrast", prompt)).sample(variants, self.contrasts)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        for prompt in dict.fromkeys(prompts):
            self.others(prompt)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        own, others = self.contrast(self.encode(images), prompts,
                                    [mix_seed(self.seed, prompt, image_digest(image)) for image, prompt in zip(images, prompts)])
        return own - others.mean(1)

    def contrast(self, latents: torch.Tensor, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(MI with own prompt [N], MI with each contrast prompt [N, K]) of scaled latents, each row's draws
        from a generator seeded by its entry of ``seeds``."""
        device = self.pipe.unet.device
        others = [self.others(p) for p in prompts]
        own, other = contrastive_mi(
            self.eps_fn, latents.to(device), encode_prompts(self.pipe, prompts),
            [encode_prompts(self.pipe, [row[k] for row in others]) for k in range(self.contrasts)],
            null_embedding(self.pipe, len(prompts)), self.scheduler, n_draws=self.n_draws,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], config=self.config,
            estimator=self.estimator, timestep_sampling=self.timestep_sampling,
        )
        return own.double().cpu(), other.double().cpu()


class StandaloneMIContrastMetric(MIContrastMetric):
    """``MIContrastMetric`` on Eq. 2's standalone estimator (MI-TUNE's own score), for comparison."""

    name = "mi_contrast_standalone"
    estimator = "standalone"

