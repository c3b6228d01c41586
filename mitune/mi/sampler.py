"""The one sampler setup: a pipeline, prompts and seeds in; latents, MI (and phrase MI, MI maps) out.

Generation rounds, evaluation, ``mitune rerank`` and the toy model's checks all sample through
``sample``, so the paper's sampling defaults (``SamplingConfig``: Algorithm 2, CFG 7.5, 50 DDPM
steps) are written here only. Each row has its own seed and CPU generator, drawn as diffusers
draws them, so a candidate does not depend on the batch it was sampled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from mitune.mi.estimators import PAPER, MIConfig, sample_with_mi
from mitune.mi.phrases import min_phrase_mi, rest_embeddings, sample_with_phrase_mi
from mitune.mi.pipeline import (
    ddpm_scheduler,
    encode_prompts,
    index_embedding,
    latent_shape,
    null_embedding,
    unet_eps_fn,
)

VARIANCE_TYPES = ("fixed_large", "fixed_small")


# The largest CFG scale accepted: the paper sweeps 1-10; far above, images saturate and the sums overflow.
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class SamplingConfig:
    """How a candidate is sampled; the defaults are the paper's (Algorithm 2): DDPM ancestral sampling
    with sigma_t^2 = beta_t (``fixed_large``), CFG 7.5, 50 steps, no noise at the last step
    (``last_step_noise=True`` adds it, as diffusers' DDPM does), MI weighted as Eq. 2 (``mi``)."""

    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    variance_type: str = "fixed_large"
    last_step_noise: bool = False
    mi: MIConfig = field(default_factory=MIConfig)

    def __post_init__(self) -> None:
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_scale > MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be <= {MAX_GUIDANCE:g}, got {self.guidance_scale}: CFG scales past "
                             "a few tens only saturate the images, and huge ones overflow to non-finite latents")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be 'fixed_large' or 'fixed_small', got {self.variance_type!r}")


PAPER_SAMPLING = SamplingConfig(mi=PAPER)


@dataclass
class Samples:
    """One batch: latents [B, C, h, w] and MI [B]; MI maps [B, C, h, w] when asked for; per-phrase
    conditional MI [B, P] and which of its columns are real phrases of the row's prompt (rows with
    fewer phrases than the batch's most are padded) when phrases were given."""

    latents: torch.Tensor
    mi: torch.Tensor
    mi_maps: torch.Tensor | None = None
    phrase_mi: torch.Tensor | None = None
    phrase_valid: torch.Tensor | None = None

    def min_phrase_mi(self) -> torch.Tensor:
        """Each row's smallest conditional MI over its phrases: its most neglected phrase."""
        if self.phrase_mi is None:
            raise ValueError("these samples were drawn without phrases")
        return min_phrase_mi(self.phrase_mi, self.phrase_valid)


@torch.no_grad()
def sample(pipe: DiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], config: SamplingConfig = PAPER_SAMPLING,
           *, phrases: Sequence[Sequence[str]] | None = None, return_map: bool = False) -> Samples:
    """Sample row i of the batch from ``prompts[i]`` with ``seeds[i]``; one text-encoder pass per
    distinct prompt. ``phrases[i]`` (the phrases of row i's prompt) adds each phrase's conditional MI,
    at P more UNet rows per step (``mitune.mi.phrases``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per row")
    if phrases is not None and return_map:
        raise ValueError("MI maps are not available with phrase MI")
    device, n = pipe.unet.device, len(seeds)
    unique = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(unique)}
    emb = index_embedding(encode_prompts(pipe, unique), torch.tensor([position[p] for p in prompts], device=device))
    null = index_embedding(null_embedding(pipe), torch.zeros(n, dtype=torch.long, device=device))
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    z_T = randn_tensor(latent_shape(pipe, n), generator=generators, device=device, dtype=torch.float32)
    scheduler = ddpm_scheduler(pipe, config.variance_type)
    common = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                  generator=generators, config=config.mi, last_step_noise=config.last_step_noise)
    if phrases is not None:
        rests, valid = rest_embeddings(pipe, list(prompts), [list(p) for p in phrases])
        z, mi, per_phrase = sample_with_phrase_mi(unet_eps_fn(pipe), z_T, emb, null, rests, scheduler, **common)
        return Samples(z, mi, phrase_mi=per_phrase, phrase_valid=valid)
    out = sample_with_mi(unet_eps_fn(pipe), z_T, emb, null, scheduler, **common, return_map=return_map)
    return Samples(out[0], out[1], mi_maps=out[2] if return_map else None)
