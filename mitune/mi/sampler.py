"""The one sampler setup: a pipeline, prompts and seeds in; latents, MI (and phrase MI, MI maps) out.

Generation rounds, evaluation, ``mitune rerank`` and the toy model's checks all sample through
``sample``, so the paper's sampling defaults (``SamplingConfig``: Algorithm 2, CFG 7.5, 50 DDPM
steps) are written here only. Each row has its own seed and CPU generator, drawn as diffusers
draws them, so a candidate does not depend on the batch it was sampled in.

``ContinuousSampler`` is the same chain with continuous batching: a fixed number of rows, each its own
candidate at its own timestep, refilled as soon as a candidate finishes or is pruned by its partial MI
(successive halving, ``generation.prune``). The batch keeps one shape, so on the CPU (checked by the tests)
each row's numbers do not depend on the other rows and a candidate is bit-identical whatever its
neighbours: resumes and ranks reproduce one uninterrupted process.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from mitune.mi.estimators import (
    PAPER,
    Embedding,
    MIConfig,
    NonFiniteMIError,
    check_sampling_args,
    ddpm_step,
    reference_eps,
    sample_with_mi,
    squared_gap,
    step_noise,
    step_weights,
)
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


@dataclass(frozen=True)
class Candidate:
    """One chain to sample: candidate ``index`` of ``group`` (a prompt; pruning ranks within it)."""

    group: int
    index: int
    prompt: str
    seed: int


@dataclass
class Outcome:
    """A candidate's end: its final latents and MI, or (``pruned_at``, the steps it ran) its partial MI
    and no latents."""

    index: int
    mi: float
    latents: torch.Tensor | None
    pruned_at: int | None = None


@dataclass
class _Chain:
    candidate: Candidate
    generator: torch.Generator
    z: torch.Tensor  # [1, C, h, w] float32, while parked or waiting
    acc: torch.Tensor  # [1] float32
    step: int = 0


@dataclass
class _Group:
    size: int
    alive: int
    parked: list[_Chain] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


def _set_row(batch: Embedding, row: int, value: Embedding) -> None:
    if isinstance(batch, torch.Tensor):
        batch[row] = value[0]
    else:
        for key in batch:
            batch[key][row] = value[key][0]


def _embedding_like(emb: Embedding, rows: int) -> Embedding:
    if isinstance(emb, torch.Tensor):
        return emb.expand(rows, *emb.shape[1:]).clone()
    return {key: value.expand(rows, *value.shape[1:]).clone() for key, value in emb.items()}


def kept_count(alive: int, fraction: float, at_least: int) -> int:
    """How many of ``alive`` candidates go on at a pruning point: ceil(fraction x alive), never under
    ``at_least`` (top_k) nor over ``alive``."""
    return min(alive, max(at_least, math.ceil(round(fraction * alive, 9))))


class ContinuousSampler:
    """Continuous batching for diffusion sampling, with successive halving by partial MI.

    ``rows`` rows are always on the device (CFG doubles them for the UNet); each holds one candidate at
    its own timestep. When ``prune_points`` ((steps done, fraction kept) pairs) stop the lowest partial-MI
    candidates of a group, or candidates finish, their rows are refilled: first with kept candidates of
    earlier groups (parked at a pruning point until their whole group got there), then with new ones.
    A candidate's chain is ``sample``'s (same seed and generator draws, same step arithmetic, applied per
    timestep to the rows at it); only the rows' neighbours in the UNet batch differ, and the batch's shape
    does not (rows with no candidate are computed and ignored), so its numbers stay those of a batch of
    ``rows``. Counts ``unet_rows`` (rows the UNet took, padding included) and ``idle_rows`` (padding).
    """

    def __init__(self, pipe: DiffusionPipeline, config: SamplingConfig, rows: int,
                 prune_points: Sequence[tuple[int, float]] = (), keep_at_least: int = 1) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.pipe, self.config, self.rows = pipe, config, rows
        self.prune_points = dict(prune_points)
        self.keep_at_least = keep_at_least
        self.scheduler = ddpm_scheduler(pipe, config.variance_type)
        check_sampling_args(self.scheduler, config.num_inference_steps, config.guidance_scale)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.cpu()
        self.device = pipe.unet.device
        self.model_dtype = pipe.unet.dtype
        weights, self.kept = step_weights(self.scheduler, config.mi)
        self.weights = weights.to(self.device)
        self.timesteps = self.scheduler.timesteps.to(self.device)
        self.mean_scale = (self.scheduler.config.num_train_timesteps / max(sum(self.kept), 1)
                           if config.mi.reduction == "mean" else None)
        self.eps_fn = unet_eps_fn(pipe)
        self.null = null_embedding(pipe)
        self.embeddings: dict[str, Embedding] = {}
        self.unet_rows = 0
        self.idle_rows = 0

    def _embedding(self, prompt: str) -> Embedding:
        """A prompt's embedding, encoded alone: the same numbers whatever else is sampled with it."""
        if prompt not in self.embeddings:
            self.embeddings[prompt] = encode_prompts(self.pipe, [prompt])
        return self.embeddings[prompt]

    def _start(self, candidate: Candidate) -> _Chain:
        generator = torch.Generator("cpu").manual_seed(candidate.seed)
        z_T = randn_tensor(latent_shape(self.pipe, 1), generator=[generator], device=self.device, dtype=torch.float32)
        return _Chain(candidate, generator, z_T.float() * self.scheduler.init_noise_sigma,
                      torch.zeros(1, device=self.device, dtype=torch.float32))

    def _mi(self, acc: torch.Tensor, candidate: Candidate) -> float:
        mi = acc * self.mean_scale if self.mean_scale is not None else acc
        if not torch.isfinite(mi).all():
            raise NonFiniteMIError(f"MI is not finite for candidate {candidate.index} of group {candidate.group} "
                                   f"({mi.item()}); check the model's dtype (fp16 overflow?) and the latents")
        return mi.item()

    @torch.no_grad()
    def run(self, candidates: Sequence[Candidate], stop: Callable[[], None] | None = None
            ) -> Iterator[tuple[int, list[Outcome]]]:
        """Sample every candidate; yields (group, its outcomes in index order) as each group ends.
        ``stop`` is called every ``num_inference_steps`` UNet calls (about one micro-batch of work)."""
        steps = self.config.num_inference_steps
        groups: dict[int, _Group] = {}
        for c in candidates:
            groups.setdefault(c.group, _Group(0, 0))
            groups[c.group].size += 1
            groups[c.group].alive += 1
        new = deque(candidates)
        resumed: deque[_Chain] = deque()
        slots: list[_Chain | None] = [None] * self.rows
        shape = latent_shape(self.pipe, self.rows)
        z = torch.zeros(shape, device=self.device, dtype=torch.float32)
        acc = torch.zeros(self.rows, device=self.device, dtype=torch.float32)
        emb = _embedding_like(self.null, self.rows)
        null = _embedding_like(self.null, self.rows)
        calls = 0
        while True:
            for row in range(self.rows):  # refill: kept candidates of earlier groups first
                if slots[row] is None and (resumed or new):
                    chain = resumed.popleft() if resumed else self._start(new.popleft())
                    slots[row] = chain
                    z[row], acc[row] = chain.z[0], chain.acc[0]
                    _set_row(emb, row, self._embedding(chain.candidate.prompt))
            active = [row for row in range(self.rows) if slots[row] is not None]
            if not active:
                break
            if stop is not None and calls % steps == 0:
                stop()
            calls += 1
            index = [slots[row].step if slots[row] is not None else 0 for row in range(self.rows)]
            t = self.timesteps[torch.tensor(index, device=self.device)]
            eps_cond, (eps_uncond,) = reference_eps(self.eps_fn, z.to(self.model_dtype), t, emb, [null])
            eps_cond, eps_uncond = eps_cond.float(), eps_uncond.float()
            self.unet_rows += 2 * self.rows
            self.idle_rows += 2 * (self.rows - len(active))
            for i in sorted({index[row] for row in active}):
                rows = [row for row in active if index[row] == i]
                self._step(i, rows, z, acc, eps_cond, eps_uncond, slots)
            for row in active:
                chain = slots[row]
                chain.step += 1
                if chain.step == steps or chain.step in self.prune_points:
                    chain.z, chain.acc = z[row : row + 1].clone(), acc[row : row + 1].clone()
                    slots[row] = None
                    group = groups[chain.candidate.group]
                    if chain.step == steps:
                        group.outcomes.append(Outcome(chain.candidate.index, self._mi(chain.acc, chain.candidate),
                                                      chain.z.to(self.model_dtype)[0]))
                    else:
                        group.parked.append(chain)
                        if len(group.parked) == group.alive:
                            resumed.extend(self._prune(group, chain.step))
                    if len(group.outcomes) == group.size:
                        yield chain.candidate.group, sorted(group.outcomes, key=lambda o: o.index)
                        del groups[chain.candidate.group]

    def _step(self, i: int, rows: list[int], z: torch.Tensor, acc: torch.Tensor, eps_cond: torch.Tensor,
              eps_uncond: torch.Tensor, slots: list[_Chain | None]) -> None:
        """One sampling step of the rows at step ``i``: ``fused_sampling``'s arithmetic on those rows."""
        idx = torch.tensor(rows, device=self.device)
        cond, uncond = eps_cond[idx], eps_uncond[idx]
        if self.kept[i]:
            acc[idx] += self.weights[i] * squared_gap(cond, uncond)
        guided = uncond + self.config.guidance_scale * (cond - uncond)
        t = self.scheduler.timesteps[i]
        noisy = t > 0 and (i < len(self.scheduler.timesteps) - 1 or self.config.last_step_noise)
        noise = step_noise(guided.shape, [slots[row].generator for row in rows], self.device) if noisy else None
        z[idx] = ddpm_step(self.scheduler, guided, t, z[idx], noise)

    def _prune(self, group: _Group, step: int) -> list[_Chain]:
        """Every running candidate of ``group`` is at ``step``: stop the lowest partial MI, return the rest
        (index order). Ties go to the lower index, as selection breaks them."""
        parked = sorted(group.parked, key=lambda c: c.candidate.index)
        partial = torch.cat([c.acc for c in parked]).double()
        order = torch.sort(-partial, stable=True).indices.tolist()
        keep = kept_count(len(parked), self.prune_points[step], self.keep_at_least)
        kept = sorted(order[:keep])
        for pos in order[keep:]:
            chain = parked[pos]
            group.outcomes.append(Outcome(chain.candidate.index, self._mi(chain.acc, chain.candidate), None, step))
        group.parked, group.alive = [], keep
        return [parked[pos] for pos in kept]
