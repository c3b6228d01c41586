"""A diffusers pipeline as the MI estimators want it: ``eps_fn``, prompt embeddings, DDPM, decoding.

Everything here defers to the pipeline's own code (``encode_prompt``, ``_get_add_time_ids``,
``image_processor``) so that sampling with ``mitune.mi.sample_with_mi`` reproduces diffusers'
pipelines bit for bit.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from mitune.mi.estimators import Embedding, EpsFn

SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")


def prediction_type(pipe: DiffusionPipeline) -> str:
    """The UNet's parameterisation; only those ``unet_eps_fn`` can turn into eps are accepted."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in SUPPORTED_PREDICTIONS:
        raise ValueError(
            f"prediction_type {kind!r} is not supported: MI-TUNE needs an eps-prediction UNet "
            f"(supported: {', '.join(SUPPORTED_PREDICTIONS)})"
        )
    return kind



def ddpm_scheduler(pipe: DiffusionPipeline, variance_type: str = "fixed_large") -> DDPMScheduler:
    """DDPM over the pipeline's training schedule, whatever scheduler it shipped.

    ``prediction_type`` is always "epsilon" because ``unet_eps_fn`` always returns eps.
    """
    return DDPMScheduler.from_config(
        pipe.scheduler.config, variance_type=variance_type, clip_sample=False, prediction_type="epsilon"
    )


# ----------------------------------------------------------------------------- conditioning


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL pipelines condition on pooled text and size ids as well as the token embeddings."""
    return "text_encoder_2" in pipe.components


def default_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    """(height, width) the pipeline generates when none is given."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return size, size


def latent_shape(pipe: DiffusionPipeline, batch: int) -> tuple[int, int, int, int]:
    """Shape of the initial noise for ``batch`` images at the default size, as ``prepare_latents``."""
    height, width = default_size(pipe)
    scale = pipe.vae_scale_factor
    return batch, pipe.unet.config.in_channels, height // scale, width // scale


def _sdxl_time_ids(pipe: StableDiffusionXLPipeline, batch: int, dtype: torch.dtype, pooled_dim: int) -> torch.Tensor:
    size = default_size(pipe)
    projection_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled_dim
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)
    return time_ids.to(pipe._execution_device).repeat(batch, 1)


@torch.no_grad()
def encode_prompts(pipe: DiffusionPipeline, prompts: list[str]) -> Embedding:
    """Prompt conditioning exactly as the pipeline builds it for its UNet.

    SD: a [B, L, D] tensor. SDXL: a dict with "encoder_hidden_states", "text_embeds" and
    "time_ids" (default size, no crop).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    device = pipe._execution_device
    if not is_sdxl(pipe):
        return pipe.encode_prompt(prompts, device, 1, False)[0]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    time_ids = _sdxl_time_ids(pipe, len(prompts), embeds.dtype, pooled.shape[-1])
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def null_embedding(pipe: DiffusionPipeline, batch_size: int = 1) -> Embedding:
    """Unconditional embedding as the pipeline's CFG uses it (empty prompt, no negative prompt).

    Encoded for the whole batch rather than broadcast so that it is the very tensor diffusers
    computes; SDXL with ``force_zeros_for_empty_prompt`` zeroes the text parts.
    """
    emb = encode_prompts(pipe, [""] * batch_size)
    if is_sdxl(pipe) and pipe.config.force_zeros_for_empty_prompt:
        emb["encoder_hidden_states"] = torch.zeros_like(emb["encoder_hidden_states"])
        emb["text_embeds"] = torch.zeros_like(emb["text_embeds"])
    return emb


def index_embedding(emb: Embedding, index: torch.Tensor) -> Embedding:
    """Rows ``index`` of an embedding, tensor or dict alike."""
    if isinstance(emb, torch.Tensor):
        return emb[index]
    return {key: value[index] for key, value in emb.items()}


def replace_rows(emb: Embedding, rows: torch.Tensor, other: Embedding) -> Embedding:
    """``emb`` with the rows where the boolean ``rows`` is set taken from ``other`` (one row, broadcast)."""
    if isinstance(emb, torch.Tensor):
        return torch.where(rows.view(-1, *[1] * (emb.dim() - 1)), other, emb)
    return {key: replace_rows(value, rows, other[key]) for key, value in emb.items()}


# ----------------------------------------------------------------------------- denoiser


def _unet_conditioning(emb: Embedding) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    if isinstance(emb, torch.Tensor):
        return emb, None
    return emb["encoder_hidden_states"], {"text_embeds": emb["text_embeds"], "time_ids": emb["time_ids"]}


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alphabar: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t, so v-prediction UNets serve as denoisers."""
    alphabar = alphabar.float().view(-1, *([1] * (v.ndim - 1)))
    return (alphabar.sqrt() * v.float() + (1 - alphabar).sqrt() * z_t.float()).to(v.dtype)


def unet_eps_fn(pipe: DiffusionPipeline) -> EpsFn:
    """The pipeline's UNet as ``eps_fn(z_t, t, emb)``; eps comes back in the UNet's dtype, as in diffusers."""
    unet = pipe.unet
    alphas_cumprod = None
    if prediction_type(pipe) == "v_prediction":  # on the UNet's device once, not copied at every step
        alphas_cumprod = ddpm_scheduler(pipe).alphas_cumprod.to(unet.device)

    def eps_fn(z_t: torch.Tensor, t: torch.Tensor, emb: Embedding) -> torch.Tensor:
        hidden, added = _unet_conditioning(emb)
        out = unet(z_t.to(unet.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
        if alphas_cumprod is None:
            return out
        return v_to_eps(out, z_t, alphas_cumprod[t])

    return eps_fn


def _unscale_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    config = pipe.vae.config
    # Only the SDXL pipeline honours a VAE's latents_mean/latents_std (e.g. Playground v2.5).
    if is_sdxl(pipe) and config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


@torch.no_grad()
def encode_images(pipe: DiffusionPipeline, images: list[Image.Image]) -> torch.Tensor:
    """Images at the pipeline's default size to scaled latents as the UNet sees them (the inverse of
    ``decode_latents``), with the posterior's mode: the latents depend on the images alone."""
    vae = pipe.vae
    height, width = default_size(pipe)
    pixels = pipe.image_processor.preprocess([image.convert("RGB") for image in images], height=height, width=width)
    # SDXL's fp16 VAE overflows; its pipeline runs the VAE in fp32 (as decode_latents does).
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
    finally:
        if upcast:
            vae.to(torch.float16)
    config = vae.config
    # Only the SDXL pipeline honours a VAE's latents_mean/latents_std (e.g. Playground v2.5).
    if is_sdxl(pipe) and config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * config.scaling_factor / std
    return latents * config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents to PIL images exactly as the pipeline's own ``output_type="pil"`` path."""
    vae = pipe.vae
    # SDXL's fp16 VAE overflows; its pipeline decodes in fp32 and casts back.
    upcast = is_sdxl(pipe) and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        latents = _unscale_latents(pipe, latents.to(vae.device, vae.dtype))
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")
