"""Point-wise mutual information between an image latent and a prompt (MI-TUNE, Eq. 2).

``I(z, p) = E_{t,eps}[kappa_t * ||eps(z_t, p, t) - eps(z_t, null, t)||^2]`` with
``kappa_t = beta_t * T / (2 * alpha_t * (1 - alphabar_t))``: the KL divergence between the
conditional and unconditional reverse chains, so it needs nothing but the model's own denoiser.

Both estimators take any ``eps_fn(z_t, t, emb) -> eps`` (batch-first, ``t`` a LongTensor [B]),
so they can be checked against an analytic denoiser as well as run on a UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

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
    ``reduction="mean"``, ``min_timestep=51`` and ``step_beta="train"``.

    ``reduction="sum"`` sums kappa_t-weighted gaps over the kept timesteps; ``"mean"`` is Eq. 2
    read literally, ``T * mean`` over the kept timesteps (kappa_t carries the factor T), with
    the sampling steps (fused) or the drawn t (standalone) as the draws of t. ``step_beta``
    is the fused estimator's beta_t: the sampling step's effective beta
    ``1 - abar_t / abar_prev`` (the KL of the chain actually sampled) or the 1000-step
    schedule's ``betas[t]`` at the step's timestep (the authors' code).
    """

    include_alpha: bool = True
    reduction: str = "sum"  # or "mean"
    min_timestep: int = 0
    step_beta: str = "effective"  # or "train"

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"MIConfig.reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.step_beta not in ("effective", "train"):
            raise ValueError(f"MIConfig.step_beta must be 'effective' or 'train', got {self.step_beta!r}")
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


def reference_eps(
    eps_fn: EpsFn, z_t: torch.Tensor, t: torch.Tensor, emb: Embedding, refs: Sequence[Embedding]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Conditional eps and the eps under each reference embedding from ONE batched call.

    The batch is ``[refs[0], emb, refs[1:]]``: with ``refs = [null]`` that is diffusers' CFG
    order, and every further reference (a "rest" prompt) costs B more rows of the same call.
    """
    embs = [refs[0], emb, *refs[1:]]
    batch = embs[0]
    for other in embs[1:]:
        batch = cat_embeddings(batch, other)
    n = len(embs)
    eps = eps_fn(torch.cat([z_t] * n), torch.cat([t] * n), batch).chunk(n)
    return eps[1], [eps[0], *eps[2:]]


def paired_eps(
    eps_fn: EpsFn, z_t: torch.Tensor, t: torch.Tensor, emb: Embedding, null_emb: Embedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional and conditional eps from ONE batched call, in diffusers' CFG order."""
    eps_cond, (eps_uncond,) = reference_eps(eps_fn, z_t, t, emb, [null_emb])
    return eps_uncond, eps_cond


def gap_map(eps_cond: torch.Tensor, eps_ref: torch.Tensor) -> torch.Tensor:
    """(eps_cond - eps_ref)^2 per latent element, in float32 whatever the model's dtype."""
    return (eps_cond.float() - eps_ref.float()).pow(2)


def squared_gap(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """||eps_cond - eps_uncond||^2 per sample, in float32 whatever the model's dtype."""
    return gap_map(eps_cond, eps_uncond).flatten(1).sum(1)


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


def per_sample(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] weight shaped to broadcast over [B, ...] latents."""
    return weight.view(-1, *[1] * (like.ndim - 1))


def _randn(shape: torch.Size, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


def _randint(low: int, high: int, n: int, generator: Generator, device: torch.device) -> torch.Tensor:
    if isinstance(generator, list):
        draws = [torch.randint(low, high, (1,), generator=g, device=g.device) for g in generator]
        return torch.cat(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, (n,), generator=generator, device=gen_device).to(device)


def _draw(proposal: torch.Tensor, n: int, generator: Generator, device: torch.device) -> torch.Tensor:
    """``n`` timesteps from a distribution over them, one per generator when given a list."""
    if isinstance(generator, list):
        draws = [torch.multinomial(proposal.to(g.device), 1, generator=g) for g in generator]
        return torch.cat(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.multinomial(proposal.to(gen_device), n, replacement=True, generator=generator).to(device)


def noised_gap(eps_fn: EpsFn, z0: torch.Tensor, t: torch.Tensor, emb: Embedding, null_emb: Embedding,
               scheduler: DDPMScheduler, generator: Generator) -> torch.Tensor:
    """Per-element squared eps gap at ``z0`` noised forward to timesteps ``t`` (one draw)."""
    z_t = scheduler.add_noise(z0, _randn(z0.shape, generator, z0), t)
    eps_uncond, eps_cond = paired_eps(eps_fn, z_t, t, emb, null_emb)
    return gap_map(eps_cond, eps_uncond)


TimestepSampling = Literal["uniform", "importance"]
TIMESTEP_SAMPLING = ("uniform", "importance")
# The default importance proposal: logistic in log-SNR (as Info-Decomp), mixed with uniform.
PROPOSAL_LOC, PROPOSAL_SCALE, UNIFORM_SHARE = 0.5, 1.0, 0.1
UNIFORM_SHARE_CALIBRATED = 0.5


def defensive(mass: torch.Tensor, min_timestep: int, uniform_share: float = UNIFORM_SHARE) -> torch.Tensor:
    """Normalise ``mass`` over t >= min_timestep and mix in ``uniform_share`` of uniform: every
    weight 1/q(t) stays below ``(T - min_timestep) / uniform_share``, so a proposal that misses
    costs at most that factor in variance and never biases the estimate."""
    if not 0 < uniform_share <= 1:
        raise ValueError(f"uniform_share must be in (0, 1], got {uniform_share}")
    mass = mass.double().clone()
    mass[:min_timestep] = 0
    uniform = torch.zeros_like(mass)
    uniform[min_timestep:] = 1
    mixed = (1 - uniform_share) * mass / mass.sum() + uniform_share * uniform / uniform.sum()
    return mixed.float()


def timestep_proposal(
    scheduler: DDPMScheduler, min_timestep: int = 0, *, loc: float = PROPOSAL_LOC, scale: float = PROPOSAL_SCALE,
) -> torch.Tensor:
    """Model-free proposal over training timesteps: logistic mass of each t's log-SNR bin.

    Eq. 2's integrand, written over log-SNR, is ``snr/2 * ||E[x0|z,p] - E[x0|z]||^2``: it grows
    with snr while the prompt still shapes the image and dies once the image is decided, a
    bump that a logistic density in log-SNR can follow (Info-Decomp samples log-SNR so). Where
    the bump sits depends on the data: see ``calibrated_proposal``.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    alphabar = scheduler.alphas_cumprod.double()
    log_snr = (alphabar / (1 - alphabar)).log()  # decreasing in t
    edges = torch.sigmoid((0.5 * (log_snr[1:] + log_snr[:-1]) - loc) / scale)
    mass = torch.cat([torch.ones(1, dtype=edges.dtype), edges]) - torch.cat([edges, torch.zeros(1, dtype=edges.dtype)])
    return defensive(mass, min_timestep)


@torch.no_grad()
def calibrated_proposal(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    emb: Embedding,
    null_emb: Embedding,
    scheduler: DDPMScheduler,
    *,
    n_draws: int,
    bins: int = 20,
    generator: Generator = None,
    config: MIConfig = PAPER,
) -> torch.Tensor:
    """The variance-optimal proposal over t, q(t) ~ sqrt(E[f_t^2]) for the per-draw term f_t,
    measured on pilot latents: ``n_draws`` uniform draws per latent, pooled in ``bins`` equal
    ranges of t, mixed with uniform (``defensive``).

    Calibrate once per model (and prompt set) on a few latents and pass the result as
    ``proposal`` to ``pointwise_mi``: the estimate stays unbiased whatever the pilot, because
    its own draws are independent of the proposal.
    """
    num_t = scheduler.config.num_train_timesteps
    alphas_cumprod = scheduler.alphas_cumprod.to(z0.device, torch.float32)
    betas = scheduler.betas.to(z0.device, torch.float32)
    width = -(-num_t // bins)
    power, count = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
    for _ in range(n_draws):
        t = _randint(config.min_timestep, num_t, z0.shape[0], generator, z0.device)
        gap = noised_gap(eps_fn, z0, t, emb, null_emb, scheduler, generator).flatten(1).sum(1)
        term = kappa(betas[t], alphas_cumprod[t], config.include_alpha) * gap
        power.index_add_(0, (t // width).cpu(), term.double().pow(2).cpu())
        count.index_add_(0, (t // width).cpu(), torch.ones(len(t), dtype=torch.float64))
    rms = (power / count.clamp(min=1)).sqrt()
    return defensive(rms.repeat_interleave(width)[:num_t], config.min_timestep, UNIFORM_SHARE_CALIBRATED)


def check_proposal(proposal: torch.Tensor, scheduler: DDPMScheduler, config: MIConfig) -> torch.Tensor:
    """A proposal must be a distribution over the training timesteps that covers every kept t:
    a t it never draws would silently drop that t's share of MI."""
    num_t = scheduler.config.num_train_timesteps
    if proposal.shape != (num_t,):
        raise ValueError(f"proposal must have shape ({num_t},), got {tuple(proposal.shape)}")
    if not (proposal[config.min_timestep:] > 0).all() or abs(proposal.sum().item() - 1) > 1e-4:
        raise ValueError(f"proposal must be positive on every t >= {config.min_timestep} and sum to 1")
    return proposal


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
    timestep_sampling: TimestepSampling = "uniform",
    proposal: torch.Tensor | None = None,
    return_map: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Standalone MI of given clean latents: average over ``n_draws`` draws of (t, eps).

    ``generator`` may be one generator or one per sample; the latter makes each sample's
    estimate independent of what else is in the batch. ``timestep_sampling="importance"``
    draws t from ``proposal`` (a probability per training timestep, e.g. from
    ``calibrated_proposal``; default ``timestep_proposal``) and weights each draw by 1/q(t):
    unbiased for the same sum, at the same 2 * B UNet rows per draw. ``null_emb`` may be any reference prompt: with
    the prompt minus a phrase it estimates that phrase's conditional MI. With ``return_map``
    it returns ``(mi, mi_map)``, ``mi_map`` the per-element terms in ``z0``'s shape.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    num_t = scheduler.config.num_train_timesteps
    if config.min_timestep >= num_t:
        raise ValueError(f"MIConfig.min_timestep={config.min_timestep} leaves no timestep of {num_t}")
    alphas_cumprod = scheduler.alphas_cumprod.to(z0.device, torch.float32)
    betas = scheduler.betas.to(z0.device, torch.float32)
    kept = num_t - config.min_timestep
    if proposal is not None and timestep_sampling != "importance":
        raise ValueError("a proposal is only used with timestep_sampling='importance'")
    if timestep_sampling == "importance":
        proposal = check_proposal(proposal, scheduler, config) if proposal is not None else timestep_proposal(
            scheduler, config.min_timestep)
        proposal = proposal.to(z0.device)
    # Uniform draws estimate the sum over kept timesteps by (count * mean); "mean" is T * mean.
    scale = (kept if proposal is None else 1.0) * (num_t / kept if config.reduction == "mean" else 1.0)
    total = torch.zeros(z0.shape if return_map else z0.shape[:1], device=z0.device, dtype=torch.float32)
    for _ in range(n_draws):
        if proposal is None:
            t = _randint(config.min_timestep, num_t, z0.shape[0], generator, z0.device)
            weight = kappa(betas[t], alphas_cumprod[t], config.include_alpha)
        else:
            t = _draw(proposal, z0.shape[0], generator, z0.device)
            weight = kappa(betas[t], alphas_cumprod[t], config.include_alpha) / proposal[t]
        gap = noised_gap(eps_fn, z0, t, emb, null_emb, scheduler, generator)
        if return_map:
            total += per_sample(weight, total) * gap
        else:
            total += weight * gap.flatten(1).sum(1)
    if not return_map:
        return check_finite(scale * total / n_draws)
    mi_map = scale * total / n_draws
    return check_finite(mi_map.flatten(1).sum(1)), mi_map


CONTRAST_ESTIMATORS = ("standalone", "likelihood")


@torch.no_grad()
def contrastive_mi(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    emb: Embedding,
    others: Sequence[Embedding],
    null_emb: Embedding,
    scheduler: DDPMScheduler,
    *,
    n_draws: int,
    generator: Generator = None,
    config: MIConfig = PAPER,
    estimator: str = "standalone",
    timestep_sampling: TimestepSampling = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-wise MI of ``z0`` with its prompt ``emb`` and with each of K ``others``, all from the SAME
    (t, eps) draws (common random numbers): returns ``(own [B], others [B, K])``.

    Shared draws make ``own - others.mean(1)`` cancel what every prompt's estimate has in common (how much
    the image draws), leaving what is specific to its prompt. ``estimator="standalone"`` is Eq. 2
    (``kappa ||eps_p - eps_null||^2``, what ``pointwise_mi`` computes; with the same uniform draws it is
    the same number). ``"likelihood"`` is the difference of denoising errors
    ``kappa (||eps - eps_null||^2 - ||eps - eps_p||^2)`` (Kong et al. 2023's point-wise i(x; p), which may
    be negative): its contrast is an ELBO estimate of log p(x | p) / p(x | p'), the diffusion classifier's
    log-likelihood ratio, where the null prediction cancels. One batched call per draw of B (K + 2) rows.
    ``timestep_sampling="importance"`` draws t from ``timestep_proposal`` weighted by 1/q(t), as ``pointwise_mi``.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if estimator not in CONTRAST_ESTIMATORS:
        raise ValueError(f"estimator must be one of {CONTRAST_ESTIMATORS}, got {estimator!r}")
    if not others:
        raise ValueError("contrastive_mi needs at least one other prompt")
    num_t = scheduler.config.num_train_timesteps
    if config.min_timestep >= num_t:
        raise ValueError(f"MIConfig.min_timestep={config.min_timestep} leaves no timestep of {num_t}")
    alphas_cumprod = scheduler.alphas_cumprod.to(z0.device, torch.float32)
    betas = scheduler.betas.to(z0.device, torch.float32)
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    proposal = (timestep_proposal(scheduler, config.min_timestep).to(z0.device) if timestep_sampling == "importance"
                else None)
    kept = num_t - config.min_timestep
    # As pointwise_mi: uniform draws estimate the sum over kept timesteps by (count * mean).
    scale = (kept if proposal is None else 1.0) * (num_t / kept if config.reduction == "mean" else 1.0)
    total = torch.zeros(z0.shape[0], 1 + len(others), device=z0.device, dtype=torch.float32)
    for _ in range(n_draws):
        if proposal is None:  # pointwise_mi's draws, in its order
            t = _randint(config.min_timestep, num_t, z0.shape[0], generator, z0.device)
            weight = kappa(betas[t], alphas_cumprod[t], config.include_alpha)
        else:
            t = _draw(proposal, z0.shape[0], generator, z0.device)
            weight = kappa(betas[t], alphas_cumprod[t], config.include_alpha) / proposal[t]
        noise = _randn(z0.shape, generator, z0)
        z_t = scheduler.add_noise(z0, noise, t)
        eps_own, (eps_null, *eps_others) = reference_eps(eps_fn, z_t, t, emb, [null_emb, *others])
        conds = [eps_own, *eps_others]
        if estimator == "standalone":
            terms = [squared_gap(eps, eps_null) for eps in conds]
        else:
            null_error = squared_gap(noise, eps_null)
            terms = [null_error - squared_gap(noise, eps) for eps in conds]
        total += weight[:, None] * torch.stack(terms, dim=1)
    mi = check_finite(scale * total / n_draws)
    return mi[:, 0], mi[:, 1:]


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
    sync. Same float32 arithmetic as diffusers, so the samples are identical. ``noise=None``
    returns the step's mean: diffusers' t = 0 step, or Algorithm 2's noiseless last step.
    """
    alphabar, alphabar_prev = step_alphabars(scheduler, t)
    beta_prod, beta_prod_prev = 1 - alphabar, 1 - alphabar_prev
    alpha = alphabar / alphabar_prev
    beta = 1 - alpha
    x0 = (z - beta_prod ** (0.5) * eps) / alphabar ** (0.5)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    z_prev = (alphabar_prev ** (0.5) * beta) / beta_prod * x0 + alpha ** (0.5) * beta_prod_prev / beta_prod * z
    if noise is None:
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
    """kappa_t of every sampling step, from the step's effective or the schedule's beta (see
    ``MIConfig.step_beta``), and which steps count (``min_timestep``); one tensor, so it goes to
    the device in one copy."""
    weights, kept = [], []
    for t in scheduler.timesteps:
        alphabar, alphabar_prev = step_alphabars(scheduler, t)
        beta = 1.0 - alphabar / alphabar_prev if config.step_beta == "effective" else scheduler.betas[t].float()
        weights.append(kappa(beta, alphabar, config.include_alpha))
        kept.append(bool(t >= config.min_timestep))
    return torch.stack(weights), kept


def check_sampling_args(scheduler: DDPMScheduler, num_inference_steps: int, guidance_scale: float) -> None:
    """Bad sampling arguments fail before the first denoiser call, naming the argument."""
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


@torch.no_grad()
def fused_sampling(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    emb: Embedding,
    refs: Sequence[Embedding],
    scheduler: DDPMScheduler,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    generator: Generator = None,
    config: MIConfig = PAPER,
    last_step_noise: bool = False,
    return_map: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loop behind ``sample_with_mi``: guided DDPM sampling (``refs[0]`` is the null
    prompt CFG uses) that accumulates, for every reference, the kappa-weighted gap between
    the conditional eps and the reference's eps: per sample [B], or per element with
    ``return_map``. Unchecked float32 accumulators, one per reference."""
    check_sampling_args(scheduler, num_inference_steps, guidance_scale)
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
    shape = z.shape if return_map else z.shape[:1]
    accs = [torch.zeros(shape, device=z.device, dtype=torch.float32) for _ in refs]
    last = len(scheduler.timesteps) - 1
    for i, t in enumerate(scheduler.timesteps):
        eps_cond, eps_refs = reference_eps(eps_fn, z.to(model_dtype), timesteps[i].expand(z.shape[0]), emb, refs)
        eps_cond, eps_uncond = eps_cond.float(), eps_refs[0].float()
        if kept[i]:
            for acc, eps_ref in zip(accs, eps_refs):
                acc += weights[i] * (gap_map(eps_cond, eps_ref) if return_map else squared_gap(eps_cond, eps_ref))
        guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        noisy = t > 0 and (i < last or last_step_noise)
        noise = step_noise(z.shape, generator, z.device) if noisy else None
        z = ddpm_step(scheduler, guided, t, z, noise)
    if config.reduction == "mean":
        accs = [acc * (scheduler.config.num_train_timesteps / max(sum(kept), 1)) for acc in accs]
    return z.to(model_dtype), accs


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
    last_step_noise: bool = False,
    return_map: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2: DDPM ancestral sampling with CFG that accumulates MI for free.

    MI comes from the unguided cond/uncond eps that CFG computes anyway, so it costs no
    extra denoiser call. ``beta_t`` is the step's effective beta ``1 - abar_t / abar_prev``
    (``MIConfig.step_beta``); the reverse variance is the scheduler's
    (``variance_type="fixed_large"`` is the paper's sigma_t^2 = beta_t). As in Algorithm 2 the
    last step adds no noise; ``last_step_noise=True`` adds it as diffusers' sampler does at
    t > 0. Returns the final latents (in ``z_T``'s dtype) and MI per sample (float32), and
    with ``return_map`` also the MI map: the per-element terms, latents' shape, summing to MI.
    """
    z, (acc,) = fused_sampling(
        eps_fn, z_T, emb, [null_emb], scheduler, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=generator, config=config,
        last_step_noise=last_step_noise, return_map=return_map,
    )
    if not return_map:
        return z, check_finite(acc)
    return z, check_finite(acc.flatten(1).sum(1)), acc
