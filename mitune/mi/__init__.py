"""The MI library: point-wise MI estimators (standalone and fused into sampling, Algorithm 2), per-phrase
conditional MI, MI maps, and the adapter that turns a diffusers pipeline into a denoiser ``eps_fn``.

It imports no Lightning, Hydra, run-dir code or metrics (``tests/test_architecture.py``)::

    from mitune.mi import pointwise_mi, sample_with_mi
"""

from mitune.mi.estimators import (
    PAPER,
    Embedding,
    EpsFn,
    MIConfig,
    NonFiniteMIError,
    kappa,
    pointwise_mi,
    sample_with_mi,
)
from mitune.mi.phrases import phrase_mi, prompt_phrases, sample_with_phrase_mi
from mitune.mi.pipeline import ddpm_scheduler, decode_latents, encode_prompts, null_embedding, unet_eps_fn
from mitune.mi.sampler import PAPER_SAMPLING, Samples, SamplingConfig, sample

__all__ = [
    "PAPER", "PAPER_SAMPLING", "Embedding", "EpsFn", "MIConfig", "NonFiniteMIError", "Samples", "SamplingConfig",
    "ddpm_scheduler", "decode_latents", "encode_prompts", "kappa", "null_embedding", "phrase_mi", "pointwise_mi",
    "prompt_phrases", "sample", "sample_with_mi", "sample_with_phrase_mi", "unet_eps_fn",
]
