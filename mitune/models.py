"""Loading SD/SDXL pipelines and exposing them the way ``mitune.mi`` wants them.

Everything here defers to the pipeline's own code (``encode_prompt``, ``_get_add_time_ids``,
``image_processor``) so that sampling with ``mitune.mi.sample_with_mi`` reproduces diffusers'
pipelines bit for bit. ``build_tiny_pipeline`` makes random-init stand-ins that run on a CPU
and never need the hub, for tests and smoke runs.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub.errors import HFValidationError
from packaging.version import Version
from PIL import Image
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from mitune import ASSETS
from mitune.mi import Embedding, EpsFn

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "[UNK]"
TINY_VOCAB = ASSETS / "tiny_vocab.txt"
TINY_MAX_LENGTH = 16
SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")
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
# Architecture of stabilityai/stable-diffusion-2-1-base unet/config.json (every architecture key that differs from diffusers' defaults).
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
# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype; older releases ignore `dtype`.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


class ModelLoadError(OSError):
    """A hub id could not be loaded: offline, not cached, gated or misspelt."""


# ----------------------------------------------------------------------------- tiny models


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


def _tiny_text_config(tokenizer: PreTrainedTokenizerFast, **extra) -> CLIPTextConfig:
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
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
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
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, projection_dim=16))
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


# ----------------------------------------------------------------------------- loading


def _is_local_path(value: str) -> bool:
    """'/x', './x', '~/x', existing paths and 'a/b/c' are paths; 'org/name' and 'name' are hub ids.

    Decided by form rather than existence, so a mistyped path fails as a missing path and never
    goes to the hub.
    """
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return True
    return os.sep in value and not _HUB_ID.fullmatch(value)


def _from_pretrained(source: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    index = DiffusionPipeline.load_config(source)
    # Skip loading the safety checker at all rather than load it and throw it away.
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    return DiffusionPipeline.from_pretrained(source, variant=variant, **{_DTYPE_KWARG: torch_dtype}, **no_checker)


def _load_local(path_or_id: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    path = Path(path_or_id).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path_or_id!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model path {path_or_id!r} has no model_index.json; expected a diffusers pipeline directory"
        )
    return _from_pretrained(str(path), torch_dtype, variant)


def _load_hub(hub_id: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    try:
        return _from_pretrained(hub_id, torch_dtype, variant)
    except (OSError, HFValidationError) as err:
        raise ModelLoadError(
            f"could not load model {hub_id!r} from the Hugging Face hub or the local cache, and no local "
            f"directory of that name exists ({err}); download it first or pass a local diffusers directory instead"
        ) from err


def prediction_type(pipe: DiffusionPipeline) -> str:
    """The UNet's parameterisation; only those ``unet_eps_fn`` can turn into eps are accepted."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in SUPPORTED_PREDICTIONS:
        raise ValueError(
            f"prediction_type {kind!r} is not supported: MI-TUNE needs an eps-prediction UNet "
            f"(supported: {', '.join(SUPPORTED_PREDICTIONS)})"
        )
    return kind


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16, so configs can name dtypes as strings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown torch dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pipeline(
    path_or_id: str,
    *,
    torch_dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from a local directory or a hub id, without safety checker."""
    path_or_id = str(path_or_id)
    load = _load_local if _is_local_path(path_or_id) else _load_hub
    pipe = load(path_or_id, resolve_dtype(torch_dtype), variant)
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"{path_or_id!r} is a {type(pipe).__name__}; only UNet-based SD/SDXL pipelines are supported")
    prediction_type(pipe)
    return pipe.to(resolve_device(device))


def tiny_default_pipeline(
    path_or_id: str | os.PathLike, *, torch_dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
) -> DiffusionPipeline:
    """The random-init stand-in (``model=tiny``): built once (seeded) into the local dir ``path_or_id``,
    then loaded like any model. The argument is named as ``load_pipeline``'s, so every model config
    has the same ``model.path_or_id`` key.

    Built in a temporary sibling and renamed, so an interrupted build never leaves a
    half-written model behind.
    """
    path = Path(path_or_id).expanduser()
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            built = build_tiny_pipeline(Path(tmp) / "model")
            try:
                built.rename(path)
            except OSError:  # built concurrently by another process: use theirs
                if not (path / "model_index.json").is_file():
                    raise
    return load_pipeline(str(path), torch_dtype=torch_dtype, device=device)


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


def compile_unet(pipe: DiffusionPipeline, batch: int, backend: str = "inductor") -> float:
    """``torch.compile`` the UNet in place and compile it now, on a CFG batch of ``batch`` images;
    returns the seconds that took, for the log (minutes on SD-size UNets, paid once per process).

    Call it after adapters are fused: peft's adapter layers would split the graph.
    """
    unet = pipe.unet
    unet.compile(backend=backend)
    n = 2 * batch
    z = torch.zeros(latent_shape(pipe, n), device=unet.device)
    null = index_embedding(null_embedding(pipe), torch.zeros(n, dtype=torch.long, device=unet.device))
    start = time.perf_counter()
    with torch.no_grad():
        unet_eps_fn(pipe)(z, torch.full((n,), 999, device=unet.device), null)
    if unet.device.type == "cuda":
        torch.cuda.synchronize(unet.device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- decoding


def _unscale_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    config = pipe.vae.config
    # Only the SDXL pipeline honours a VAE's latents_mean/latents_std (e.g. Playground v2.5).
    if is_sdxl(pipe) and config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


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
