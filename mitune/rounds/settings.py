"""Algorithm 1's settings, typed: one round's sampling and selection (``GenerationConfig``) and its
fine-tuning (``TrainConfig``). The defaults are the paper's and are written only here (sampling in
``mitune.mi.sampler.SamplingConfig``): ``conf/<group>/paper.yaml`` composes them (``mitune.config``).

Plain dataclasses with range checks, so evaluation can type its config without loading the training
stack, and a strategy's name is checked by ``mitune.rounds.selection`` before any generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from mitune.mi.estimators import MIConfig
from mitune.mi.sampler import PAPER_SAMPLING, SamplingConfig

SEED_MODES = ("per_prompt", "shared")


def check_top_k(num_candidates: int, k: int) -> None:
    if num_candidates < 1:
        raise ValueError(f"num_candidates (M) must be >= 1, got {num_candidates}")
    if not 1 <= k <= num_candidates:
        raise ValueError(f"top_k must be in [1, M={num_candidates}], got {k}")


def prune_schedule(prune: object, num_inference_steps: int) -> tuple[tuple[float, float], ...]:
    """``generation.prune`` checked and as a tuple of (fraction of steps done, fraction kept) pairs: the
    fractions of steps strictly increasing in (0, 1), each at a distinct step in [1, steps - 1], the kept
    fractions in (0, 1]."""
    try:
        pairs = tuple((float(f), float(k)) for f, k in prune)  # type: ignore[union-attr,misc]
    except (TypeError, ValueError):
        raise ValueError(f"generation.prune must be a list of [fraction of steps, fraction kept] pairs, got {prune!r}") from None
    steps = [prune_step(f, num_inference_steps) for f, _ in pairs]
    for (f, k), step in zip(pairs, steps):
        if not (0 < f < 1 and 0 < k <= 1):
            raise ValueError(f"generation.prune: each pair needs 0 < fraction of steps < 1 and 0 < fraction kept <= 1, "
                             f"got [{f:g}, {k:g}]")
        if not 1 <= step < num_inference_steps:
            raise ValueError(f"generation.prune: fraction {f:g} of {num_inference_steps} steps is step {step}, outside "
                             f"[1, {num_inference_steps - 1}]")
    if any(b <= a for a, b in pairwise(steps)):
        raise ValueError(f"generation.prune: the points must fall on increasing steps of {num_inference_steps}, "
                         f"got steps {steps}")
    return pairs


def prune_step(fraction: float, num_inference_steps: int) -> int:
    """The number of sampling steps done at a pruning point."""
    return round(fraction * num_inference_steps)


@dataclass(frozen=True)
class GenerationConfig:
    """One round's sampling and selection settings.

    The defaults are the paper's (Algorithm 1): M=50 candidates, top-1 by MI, sampled as
    ``SamplingConfig`` (CFG 7.5, 50 DDPM steps with sigma_t^2 = beta_t), a distinct seed per
    (prompt, candidate). The sampling keys stay flat (``generation.guidance_scale=``) as users sweep them.
    """

    num_candidates: int = 50
    top_k: int = 1
    guidance_scale: float = PAPER_SAMPLING.guidance_scale
    num_inference_steps: int = PAPER_SAMPLING.num_inference_steps
    micro_batch: int = 50
    seed: int = 0
    seed_mode: str = "per_prompt"  # or "shared"
    variance_type: str = PAPER_SAMPLING.variance_type
    # Algorithm 2 adds no noise at the last step; True adds it as diffusers' DDPM does at t=1.
    last_step_noise: bool = PAPER_SAMPLING.last_step_noise
    # Also keep each candidate's MI map: "mi_maps" in the latents file and an overlay PNG.
    save_mi_maps: bool = False
    # Rank candidates by: mi (MI-TUNE), phrase_mi (smallest per-phrase conditional MI; P more
    # UNet rows per step for P phrases), random (the control) or an alignment metric's name
    # (mitune.rounds.selection; toy_oracle is the toy world's upper bound).
    selection: str = "mi"
    mi: MIConfig = field(default_factory=MIConfig)
    # Successive halving by partial MI (not in the paper; empty = the paper): (fraction of the sampling
    # steps done, fraction of the still-running candidates kept) pairs, e.g. [[0.4, 0.5], [0.7, 0.5]]. At
    # each point the lowest-MI candidates of each prompt stop (never below top_k); rows refill with the
    # next prompts' candidates (mitune.mi.sampler.ContinuousSampler). Stored as a tuple of pairs.
    prune: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_top_k(self.num_candidates, self.top_k)
        object.__setattr__(self, "prune", prune_schedule(self.prune, self.num_inference_steps))
        if self.prune and self.selection == "phrase_mi":
            raise ValueError("generation.prune is not available with selection=phrase_mi (it prunes by MI)")
        if self.prune and self.save_mi_maps:
            raise ValueError("generation.prune is not available with save_mi_maps")
        self.sampling  # noqa: B018  (checks the sampling settings)
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"seed_mode must be 'per_prompt' or 'shared', got {self.seed_mode!r}")
        if self.save_mi_maps and self.selection == "phrase_mi":
            raise ValueError("save_mi_maps is not available with selection=phrase_mi")

    @property
    def prune_points(self) -> tuple[tuple[int, float], ...]:
        """The pruning points as (steps done, fraction kept)."""
        return tuple((prune_step(f, self.num_inference_steps), k) for f, k in self.prune)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                              variance_type=self.variance_type, last_step_noise=self.last_step_noise, mi=self.mi)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the paper's (Table 8): AdamW lr 1e-4, betas
    (0.9, 0.999), weight decay 1e-2, eps 1e-8, constant LR, batch 400, 300 iterations per round,
    t ~ U(500, 1000). They are written only here: ``conf/train/paper.yaml`` composes them (see
    ``mitune.config``); the gradient clipping (norm 1.0) is the Lightning Trainer's, in
    ``conf/trainer/default.yaml``. Gradient accumulation is derived:
    effective_batch = micro_batch x accumulation x devices (must divide exactly).
    """

    effective_batch: int = 400
    micro_batch: int = 8
    steps_per_round: int = 300
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    t_min: int = 500
    t_max: int = 1000
    # diffusers' `proportion_empty_prompts`: the share of samples trained on the empty prompt, so the
    # unconditional branch that CFG subtracts learns the round's images too. The paper: 0.
    empty_prompt_prob: float = 0.0
    train_text_encoder: bool = False
    # DoRA's weight norm once per optimizer step instead of per micro-batch: exact, and faster with
    # gradient accumulation (DoraNormCache, docs/benchmarks/training_cpu.md).
    cache_dora_norm: bool = True
    # Recompute the UNet's activations in the backward pass (diffusers' gradient checkpointing): SDXL at
    # 1024 px needs it where memory is short (its smoke run's training step was OOM-killed at 20 GiB without).
    gradient_checkpointing: bool = False
    # Real image-prompt pairs in each round's set (the paper's Table 3 "MI + Real", Table 5's DiffusionDB images): a
    # Hugging Face imagefolder whose metadata.jsonl has a `real_prompt_column`. real_fraction f of a round's N selected
    # images (prompts x top_k) are replaced by round(f N) real pairs, drawn per (seed, round); f = 1 trains on the whole
    # folder alone and generates nothing (mitune.rounds.external). The paper's MI-TUNE: none.
    real_images: str | None = None
    real_fraction: float = 0.0
    real_prompt_column: str = "prompt"
    # Not in the paper (issue 31: its rounds collapse on the toy world as the adapter keeps training on its own guided
    # samples): each round r > 1 restarts from the base model (the adapter at its round-1 initial values, AdamW's state
    # cleared) and trains on the union of rounds 1..r's selected sets; round r's candidates still come from round
    # r-1's model. The paper: False, the adapter and optimizer carry over and round r trains on round r's set alone.
    restart: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("effective_batch", "micro_batch", "steps_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"train.t_min/t_max must satisfy 0 <= t_min < t_max, got {self.t_min}, {self.t_max}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.empty_prompt_prob < 1:
            raise ValueError(f"train.empty_prompt_prob must be in [0, 1), got {self.empty_prompt_prob}")
        if not 0 <= self.real_fraction <= 1:
            raise ValueError(f"train.real_fraction must be in [0, 1], got {self.real_fraction}")
        if (self.real_fraction > 0) != (self.real_images is not None):
            raise ValueError("train.real_images and train.real_fraction > 0 go together: the folder of real pairs and "
                             f"their share of each round's set (got real_images={self.real_images!r}, "
                             f"real_fraction={self.real_fraction})")
        if self.restart and self.real_images is not None:
            raise ValueError("train.restart is not available with train.real_images (the real pairs are mixed into one "
                             "round's set, not into the union of rounds restart trains on)")
        if self.gradient_checkpointing and self.cache_dora_norm:
            # The recomputed forward would take the cached norm and save fewer tensors than the first one did.
            raise ValueError("train.gradient_checkpointing=true needs train.cache_dora_norm=false: the DoRA norm cache "
                             "changes the forward that checkpointing recomputes")
