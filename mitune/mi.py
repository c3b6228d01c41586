"""Point-wise mutual information between an image latent and a prompt (MI-TUNE, Eq. 2).

``I(z, p) = E_{t,eps}[kappa_t * ||eps(z_t, p, t) - eps(z_t, null, t)||^2]`` with
``kappa_t = beta_t * T / (2 * alpha_t * (1 - alphabar_t))``: the KL divergence between the
conditional and unconditional reverse chains, so it needs nothing but the model's own denoiser.

Both estimators take any ``eps_fn(z_t, t, emb) -> eps`` (batch-first, ``t`` a LongTensor [B]),
so they can be checked against an analytic denoiser as well as run on a UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

Embedding = Union[torch.Tensor, Mapping[str, torch.Tensor]]
EpsFn = Callable[[torch.Tensor, torch.Tensor, Embedding], torch.Tensor]
Generator = Union[torch.Generator, list[torch.Generator], None]


class NonFiniteMIError(FloatingPointError):
    """MI came out NaN or inf: ranking on it would silently pick garbage."""


@dataclass(frozen=True)
class MIConfig:
    """How MI is weighted and reduced over timesteps.

    The paper's choice is the default. The authors' public code uses ``include_alpha=False``,
    ``reduction="mean"`` and ``min_timestep=50``.
    """

    include_alpha: bool = True
    reduction: str = "sum"  # or "mean"
    min_timestep: int = 0

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"MIConfig.reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.min_timestep < 0:
            raise ValueError(f"MIConfig.min_timestep must be >= 0, got {self.min_timestep}")


PAPER = MIConfig()


def kappa(beta: torch.Tensor, alphabar: torch.Tensor, include_alpha: bool = True) -> torch.Tensor:
    """Weight of one step's squared eps gap: the Gaussian KL factor for sigma_t^2 = beta_t."""
    denom = 2.0 * (1.0 - alphabar)
    if include_alpha:
        denom = denom * (1.0 - beta)
    return beta / denom


def cat_embeddings(a: Embedding, b: Embedding) -> Embedding:
    """Concatenate two embeddings (tensors or dicts of tensors) along the batch."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return {key: torch.cat([a[key], b[key]]) for key in a}


def paired_eps(
    eps_fn: EpsFn, z_t: torch.Tensor, t: torch.Tensor, emb: Embedding, null_emb: Embedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional and conditional eps from ONE batched call, in diffusers' CFG order."""
    eps = eps_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), cat_embeddings(null_emb, emb))
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond, eps_cond


def squared_gap(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """||eps_cond - eps_uncond||^2 per sample, in float32 whatever the model's dtype."""
    diff = eps_cond.float() - eps_uncond.float()
    return diff.pow(2).flatten(1).sum(1)


def check_finite(mi: torch.Tensor) -> torch.Tensor:
    """Raise on NaN/inf MI, naming the samples; one host sync at the very end."""
    bad = ~torch.isfinite(mi)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise NonFiniteMIError(
            f"MI is not finite for batch indices {idx} (values {mi[bad].tolist()}); "
            "check the model's dtype (fp16 overflow?) and the latents"
        )
    return mi


def _randn(shape: torch.Size, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


def _randint(low: int, high: int, n: int, generator: Generator, device: torch.device) -> torch.Tensor:
    if isinstance(generator, list):
        draws = [torch.randint(low, high, (1,), generator=g, device=g.device) for g in generator]
        return torch.cat(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, (n,), generator=generator, device=gen_device).to(device)


@torch.no_grad()
def pointwise_mi(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    emb: Embedding,
    null_emb: Embedding,
    scheduler: DDPMScheduler,
    *,
    n_draws: int,
    generator: Generator = None,
    config: MIConfig = PAPER,
) -> torch.Tensor:
    """Standalone MI of given clean latents: average over ``n_draws`` draws of (t, eps).

    ``generator`` may be one generator or one per sample; the latter makes each sample's
    estimate independent of what else is in the batch.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    num_t = scheduler.config.num_train_timesteps
    if config.min_timestep >= num_t:
        raise ValueError(f"MIConfig.min_timestep={config.min_timestep} leaves no timestep of {num_t}")
    alphas_cumprod = scheduler.alphas_cumprod.to(z0.device, torch.float32)
    betas = scheduler.betas.to(z0.device, torch.float32)
    # The "sum" reduction estimates sum_t over the kept timesteps by (count * mean).
    scale = (num_t - config.min_timestep) if config.reduction == "sum" else 1.0
    total = torch.zeros(z0.shape[0], device=z0.device, dtype=torch.float32)
    for _ in range(n_draws):
        t = _randint(config.min_timestep, num_t, z0.shape[0], generator, z0.device)
        noise = _randn(z0.shape, generator, z0)
        z_t = scheduler.add_noise(z0, noise, t)
        eps_uncond, eps_cond = paired_eps(eps_fn, z_t, t, emb, null_emb)
        weight = kappa(betas[t], alphas_cumprod[t], config.include_alpha)
        total += weight * squared_gap(eps_cond, eps_uncond)
    return check_finite(scale * total / n_draws)


def step_alphabars(scheduler: DDPMScheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alphabar at this step and at the step the sampler goes to next (1 past the end)."""
    alphas_cumprod = scheduler.alphas_cumprod
    prev_t = scheduler.previous_timestep(t)
    alphabar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    return alphas_cumprod[t].float(), torch.as_tensor(alphabar_prev).float()


def check_sampler(scheduler: DDPMScheduler) -> None:
    """``ddpm_step`` covers the DDPM settings Stable Diffusion uses; refuse the rest by name."""
    config = scheduler.config
    if config.prediction_type != "epsilon":
        raise ValueError(f"sample_with_mi needs an epsilon-prediction scheduler, got {config.prediction_type!r}")
    if config.variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"sample_with_mi supports variance_type fixed_small or fixed_large, got {config.variance_type!r}")
    if config.thresholding:
        raise ValueError("sample_with_mi does not support the scheduler's dynamic thresholding")


def ddpm_step(scheduler: DDPMScheduler, eps: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """``DDPMScheduler.step`` (epsilon prediction) with the step's noise passed in.

    diffusers draws the noise inside ``step`` and, with CPU generators, copies it to the GPU
    synchronously at every step; taking it as an argument lets the loop run without a host
    sync. Same float32 arithmetic as diffusers, so the samples are identical.
    """
    alphabar, alphabar_prev = step_alphabars(scheduler, t)
    beta_prod, beta_prod_prev = 1 - alphabar, 1 - alphabar_prev
    alpha = alphabar / alphabar_prev
    beta = 1 - alpha
    x0 = (z - beta_prod ** (0.5) * eps) / alphabar ** (0.5)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    z_prev = (alphabar_prev ** (0.5) * beta) / beta_prod * x0 + alpha ** (0.5) * beta_prod_prev / beta_prod * z
    if t == 0:
        return z_prev
    variance = beta
    if scheduler.config.variance_type == "fixed_small":
        variance = torch.clamp(beta_prod_prev / beta_prod * beta, min=1e-20)
    return z_prev + variance ** 0.5 * noise


def step_noise(shape: torch.Size, generator: Generator, device: torch.device) -> torch.Tensor:
    """One step's noise, drawn as diffusers draws it (same generators, same order) but moved to
    the device asynchronously: a plain ``.to(device)`` of CPU-drawn noise waits for the GPU."""
    first = generator[0] if isinstance(generator, list) else generator
    if first is None or first.device.type == device.type:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    if device.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


def step_weights(scheduler: DDPMScheduler, config: MIConfig) -> tuple[torch.Tensor, list[bool]]:
    """kappa_t of every sampling step, from the step's effective beta, and which steps count
    (``min_timestep``); one tensor, so it goes to the device in one copy."""
    weights, kept = [], []
    for t in scheduler.timesteps:
        alphabar, alphabar_prev = step_alphabars(scheduler, t)
        weights.append(kappa(1.0 - alphabar / alphabar_prev, alphabar, config.include_alpha))
        kept.append(bool(t >= config.min_timestep))
    return torch.stack(weights), kept


@torch.no_grad()
def sample_with_mi(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    emb: Embedding,
    null_emb: Embedding,
    scheduler: DDPMScheduler,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    generator: Generator = None,
    config: MIConfig = PAPER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2: DDPM ancestral sampling with CFG that accumulates MI for free.

    MI comes from the unguided cond/uncond eps that CFG computes anyway, so it costs no
    extra denoiser call. ``beta_t`` is the step's effective beta ``1 - abar_t / abar_prev``;
    the reverse variance is the scheduler's (``variance_type="fixed_large"`` is the paper's
    sigma_t^2 = beta_t). Returns the final latents (in ``z_T``'s dtype) and MI per sample
    (float32).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    check_sampler(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    num_t = scheduler.config.num_train_timesteps
    if int(scheduler.timesteps.max()) >= num_t:
        raise ValueError(
            f"{num_inference_steps} inference steps with timestep_spacing="
            f"{scheduler.config.timestep_spacing!r} and steps_offset={scheduler.config.steps_offset} "
            f"reach timestep {int(scheduler.timesteps.max())} >= num_train_timesteps={num_t}; "
            "use fewer steps, steps_offset=0 or timestep_spacing='trailing'"
        )
    # The chain itself runs in float32: in bf16, 1000 small ancestral updates round away and
    # visibly shrink the samples (and bias MI); only the denoiser sees the caller's dtype.
    # Everything the loop needs from the host is prepared before it, and MI stays on the
    # device, so the loop never waits for the GPU (one sync at the end, in check_finite).
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()  # add_noise moves it to the device
    model_dtype = z_T.dtype
    z = z_T.float() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps.to(z.device)
    weights, kept = step_weights(scheduler, config)
    weights = weights.to(z.device)
    mi = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        eps_uncond, eps_cond = paired_eps(eps_fn, z.to(model_dtype), timesteps[i].expand(z.shape[0]), emb, null_emb)
        eps_uncond, eps_cond = eps_uncond.float(), eps_cond.float()
        if kept[i]:
            mi += weights[i] * squared_gap(eps_cond, eps_uncond)
        guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        noise = step_noise(z.shape, generator, z.device) if t > 0 else None
        z = ddpm_step(scheduler, guided, t, z, noise)
    if config.reduction == "mean":
        mi = mi / max(sum(kept), 1)
    return z.to(model_dtype), check_finite(mi)
