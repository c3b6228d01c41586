"""Per-phrase conditional MI: how much one phrase of a prompt, given the rest, shaped an image.

``I(z; phrase | rest)`` is Eq. 2 with the prompt minus the phrase (the "rest" prompt) in place
of the null prompt: the KL between the reverse chains conditioned on the whole prompt and on
the rest. A phrase the image ignores (a neglected object or attribute) adds little beyond the
rest, so its conditional MI is small. Phrases default to the prompt's noun phrases
(``mitune.prompts.phrases.noun_chunks``); any words of the prompt can be given instead.

Cost in UNet rows (one row = one latent through the UNet): standalone, 2 per draw per phrase
per latent; fused into sampling, P more per latent per step for P phrases on top of CFG's 2
(so ``(2 + P) / 2`` times the plain sampler's UNet work).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from mitune.mi.estimators import (
    PAPER,
    Embedding,
    EpsFn,
    Generator,
    MIConfig,
    TimestepSampling,
    check_finite,
    fused_sampling,
    pointwise_mi,
)
from mitune.mi.pipeline import ddpm_scheduler, encode_prompts, index_embedding, unet_eps_fn
from mitune.prompts.phrases import find_relation, noun_chunks

JOINERS = ("and", "or", ",", "with")
"""Words left dangling at either end of the rest prompt once a phrase is cut out."""


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt.strip()


def _match(prompt: str, phrase: str) -> re.Match | None:
    return re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", prompt)


def rest_prompt(prompt: str, phrase: str) -> str:
    """The prompt without ``phrase`` (its first whole-word occurrence), joiners left dangling at
    either end dropped: "a red cube and a blue ball" minus "a red cube" is "a blue ball"."""
    match = _match(prompt, phrase)
    if match is None:
        raise ValueError(f"phrase {phrase!r} is not in prompt {prompt!r}")
    words = (prompt[: match.start()] + " " + prompt[match.end():]).replace(",", " , ").split()
    while words and words[0].lower() in JOINERS:
        words.pop(0)
    while words and words[-1].lower() in JOINERS:
        words.pop()
    return " ".join(words).replace(" ,", ",")


def prompt_phrases(prompt: str, phrases: list[str] | None = None, use_spacy: bool = True) -> list[str]:
    """The phrases to score: the given ones (each must occur in the prompt) or its noun phrases
    (without those inside a spatial relation such as "on the left of")."""
    prompt = check_prompt(prompt)
    if phrases is None:
        relation = find_relation(prompt) or ""
        found = [c for c in noun_chunks(prompt, use_spacy) if c not in relation]  # not "the left" of "on the left of"
        if not found:
            raise ValueError(f"prompt {prompt!r} has no noun phrase to score; pass phrases explicitly")
        return found
    if not phrases:
        raise ValueError("phrases is empty; pass None to use the prompt's noun phrases")
    for phrase in phrases:
        if not phrase.strip() or _match(prompt, phrase) is None:
            raise ValueError(
                f"unknown phrase {phrase!r}: not in prompt {prompt!r} (its noun phrases: {noun_chunks(prompt, use_spacy)})"
            )
    return list(phrases)


def check_phrases(prompts: Iterable[str]) -> None:
    """Every prompt has a phrase to score, checked before any sampling: ``prompt_phrases`` names the first that
    has none."""
    for prompt in prompts:
        prompt_phrases(prompt)


def phrase_embeddings(pipe: DiffusionPipeline, prompt: str, phrases: list[str], batch: int
                      ) -> tuple[Embedding, list[Embedding]]:
    """The prompt's embedding and each rest prompt's, repeated to ``batch`` rows."""
    texts = [prompt] + [rest_prompt(prompt, p) for p in phrases]
    encoded = encode_prompts(pipe, texts)
    rows = [index_embedding(encoded, torch.full((batch,), i, dtype=torch.long, device=pipe.unet.device))
            for i in range(len(texts))]
    return rows[0], rows[1:]


def phrase_mi(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    prompt: str,
    phrases: list[str] | None = None,
    *,
    n_draws: int = 32,
    seed: int = 0,
    config: MIConfig = PAPER,
    timestep_sampling: TimestepSampling = "uniform",
) -> torch.Tensor:
    """Standalone ``I(z; phrase | rest)`` of saved (scaled) latents [N, C, h, w] of one prompt:
    [N, P] in float32, one column per phrase (``prompt_phrases``)."""
    prompt = check_prompt(prompt)
    phrases = prompt_phrases(prompt, phrases)
    if latents.ndim != 4:
        raise ValueError(f"latents must be [N, C, h, w], got shape {tuple(latents.shape)}")
    latents = latents.to(pipe.unet.device)
    emb, rests = phrase_embeddings(pipe, prompt, phrases, len(latents))
    scheduler, eps_fn = ddpm_scheduler(pipe), unet_eps_fn(pipe)
    columns = []
    for k, rest in enumerate(rests):
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + 1009 * k + i) for i in range(len(latents))]
        columns.append(pointwise_mi(eps_fn, latents, emb, rest, scheduler, n_draws=n_draws, generator=generators,
                                    config=config, timestep_sampling=timestep_sampling))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def sample_with_phrase_mi(
    eps_fn: EpsFn,
    z_T: torch.Tensor,
    emb: Embedding,
    null_emb: Embedding,
    rest_embs: list[Embedding],
    scheduler: DDPMScheduler,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    generator: Generator = None,
    config: MIConfig = PAPER,
    last_step_noise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample_with_mi`` that also accumulates each phrase's conditional MI along the chain:
    returns latents, MI [B] and phrase MI [B, P]. The rest prompts ride in the same UNet call
    as CFG's two rows (P more rows per latent per step); the samples are those of
    ``sample_with_mi`` with the same generators."""
    if not rest_embs:
        raise ValueError("rest_embs is empty: give one rest-prompt embedding per phrase")
    z, accs = fused_sampling(
        eps_fn, z_T, emb, [null_emb, *rest_embs], scheduler, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=generator, config=config, last_step_noise=last_step_noise,
    )
    return z, check_finite(accs[0]), torch.stack([check_finite(acc) for acc in accs[1:]], dim=1)


def rest_embeddings(pipe: DiffusionPipeline, prompts: list[str], phrases: list[list[str]]
                    ) -> tuple[list[Embedding], torch.Tensor]:
    """Rest-prompt embeddings for a batch of (possibly different) prompts, phrase k of row r in
    the k-th embedding, and a [B, P] mask of the real ones: a prompt with fewer phrases than
    the batch's most fills its slots with itself (a zero gap, masked out)."""
    width = max(len(ph) for ph in phrases)
    valid = torch.tensor([[k < len(ph) for k in range(width)] for ph in phrases])
    texts = [rest_prompt(p, ph[k]) if k < len(ph) else p for k in range(width) for p, ph in zip(prompts, phrases)]
    encoded = encode_prompts(pipe, texts)
    device = pipe.unet.device
    rows = [index_embedding(encoded, torch.arange(k * len(prompts), (k + 1) * len(prompts), device=device))
            for k in range(width)]
    return rows, valid.to(device)


def min_phrase_mi(per_phrase: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's smallest conditional MI over its real phrases: the most neglected phrase."""
    return per_phrase.masked_fill(~valid, torch.inf).min(dim=1).values
