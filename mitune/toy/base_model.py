"""Train the toy world's base text-to-image model from scratch on CPU (``make toy-model``).

A Stable Diffusion pipeline in miniature (AutoencoderKL, UNet2DConditionModel, CLIPTextModel
with a word-level tokenizer, DDPM schedule of SD), so every mitune code path runs on it
unchanged. Two stages: the VAE learns to reconstruct 32 px scenes, then the UNet and the text
encoder learn eps-prediction on the VAE's latents with caption dropout (for classifier-free
guidance). Training scenes never bind a held-out (color, shape) or (size, shape) pairing,
not even through attributes the caption leaves unspecified, so test prompts probe bindings the
model has never seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm
from transformers import CLIPTextModel

from mitune import ASSETS
from mitune.models.builders import SD_DDPM_CONFIG, tiny_text_config, tiny_tokenizer
from mitune.toy.world import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Obj,
    Scene,
    Split,
    prompt,
    render,
    sample_scene,
    split_prompts,
    to_tensor,
)

log = logging.getLogger(__name__)

MODEL_DIR = ASSETS / "toy-model"
"""Where the committed base model lives (package data): the project's embedded default."""
SPLIT_SEED = 0
"""The held-out pairings of the committed model; experiments must use the same split."""
IMAGE_SIZE = 32
MAX_LENGTH = 20
CATEGORY_WEIGHTS = {"color": 0.2, "shape": 0.2, "texture": 0.2, "spatial": 0.2, "complex": 0.2}


def toy_vocab() -> list[str]:
    """Every word the toy grammar can produce."""
    relation_words = sorted({w for r in RELATIONS for w in r.split()})
    return ["a", "and", *SIZES, *TEXTURES, *COLORS, *SHAPES, *relation_words]


def build_toy_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Random-init toy architecture: 32 px images, 4x16x16 latents, a 1.7M-parameter UNet."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(toy_vocab(), MAX_LENGTH)
    text_config = tiny_text_config(tokenizer)
    text_config.hidden_size, text_config.intermediate_size = 64, 128
    text_encoder = CLIPTextModel(text_config)
    vae = AutoencoderKL(
        sample_size=IMAGE_SIZE,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=text_config.hidden_size,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**SD_DDPM_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------- data


def complete_scene(scene: Scene, split: Split, rng: np.random.Generator) -> Scene:
    """Fill unspecified colors and sizes with values that bind no held-out pairing."""
    objects: list[Obj] = []
    taken = {o.color for o in scene.objects if o.color}
    for obj in scene.objects:
        color, size = obj.color, obj.size
        if color is None:
            choices = [c for c in COLORS if c not in taken and (c, obj.shape) not in split.held_out_color_shape]
            color = str(rng.choice(choices))
            taken.add(color)
        if size is None:
            size = str(rng.choice([s for s in SIZES if (s, obj.shape) not in split.held_out_size_shape]))
        objects.append(replace(obj, color=color, size=size, texture=obj.texture or "solid"))
    return Scene(tuple(objects), scene.relation)


def training_pairs(split: Split, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` (caption, image) pairs from the grammar, none binding a held-out pairing."""
    rng = np.random.default_rng(seed)
    categories, weights = list(CATEGORY_WEIGHTS), list(CATEGORY_WEIGHTS.values())
    captions, images = [], np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    while len(captions) < n:
        scene = sample_scene(str(rng.choice(categories, p=weights)), rng)
        if any(split.is_held_out(o) for o in scene.objects):
            continue
        images[len(captions)] = render(complete_scene(scene, split, rng), IMAGE_SIZE, rng)
        captions.append(prompt(scene))
    return captions, images


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ToyTrainConfig:
    """Recipe of the committed model (see its model card for the measured time)."""

    seed: int = 0
    num_images: int = 40_000
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 2
    card_per_category: int = 4
    """Prompts per category (train and test) whose oracle scores go into the model card."""


def _warmup(step: int, warmup: int) -> float:
    # Not diffusers' get_constant_schedule_with_warmup: that gives step / warmup (lr 0 on the first
    # step), and this (step + 1) / warmup is the recipe the committed model was trained with.
    return min(1.0, (step + 1) / warmup)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: ToyTrainConfig) -> list[float]:
    """Reconstruction + a light KL; flat-colored scenes need no perceptual or GAN loss."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, config.warmup_steps))
    losses = []
    vae.train()
    for _ in tqdm(range(config.vae_steps), desc="vae", dynamic_ncols=True):
        x = images[torch.randint(len(images), (config.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means, scaled to unit std as SD's ``scaling_factor`` does (set on the VAE)."""
    latents = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def constant_ema(params: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """EMA with the same ``decay`` from the first step: ``min_decay=decay`` and ``update_after_step=-1``
    switch off EMAModel's decay warm-up, which the committed model was not trained with."""
    return EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1, foreach=True)


def train_denoiser(pipe: StableDiffusionPipeline, latents: torch.Tensor, captions: list[str],
                   config: ToyTrainConfig) -> list[float]:
    """eps-MSE over t ~ U[0, T) for UNet + text encoder jointly; EMA weights are kept."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    ids = pipe.tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids
    null_ids = pipe.tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    scheduler = pipe.scheduler
    modules = [pipe.unet, pipe.text_encoder]
    params = [p for m in modules for p in m.parameters()]
    ema = constant_ema(params, config.ema_decay)
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, config.warmup_steps))
    for m in modules:
        m.train()
    losses = []
    for _ in tqdm(range(config.unet_steps), desc="unet", dynamic_ncols=True):
        idx = torch.randint(len(latents), (config.unet_batch,), generator=gen)
        tokens = ids[idx].clone()
        drop = torch.rand(config.unet_batch, generator=gen) < config.caption_dropout
        tokens[drop] = null_ids
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (config.unet_batch,), generator=gen)
        z_t = scheduler.add_noise(z0, noise, t)
        pred = pipe.unet(z_t, t, pipe.text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    for m in modules:
        m.eval()
    return losses


def train_toy_model(config: ToyTrainConfig) -> tuple[StableDiffusionPipeline, dict]:
    """Both stages; returns the pipeline and a record of what was done (for the model card)."""
    torch.set_num_threads(config.threads)
    split = split_prompts(SPLIT_SEED, n_train=0, n_test=0)
    start = time.perf_counter()
    captions, images = training_pairs(split, config.num_images, config.seed)
    pixels = to_tensor(images)
    pipe = build_toy_pipeline(config.seed)
    vae_losses = train_vae(pipe.vae, pixels, config)
    latents = encode_images(pipe.vae, pixels)
    unet_losses = train_denoiser(pipe, latents, captions, config)
    record = {
        "config": asdict(config),
        "split_seed": SPLIT_SEED,
        "held_out_color_shape": sorted(map(list, split.held_out_color_shape)),
        "held_out_size_shape": sorted(map(list, split.held_out_size_shape)),
        "train_seconds": round(time.perf_counter() - start, 1),
        "vae_final_loss": float(np.mean(vae_losses[-100:])),
        "unet_final_loss": float(np.mean(unet_losses[-100:])),
        "machine": f"{platform.processor() or platform.machine()}, {config.threads} threads, torch {torch.__version__}",
    }
    return pipe, record


@torch.no_grad()
def oracle_scores(pipe: StableDiffusionPipeline, per_category: int = 4, images: int = 4, cfg: float = 7.5,
                  steps: int = 25) -> dict[str, dict[str, float]]:
    """Mean oracle score per category on train and held-out test prompts (for the model card)."""
    from mitune.mi.pipeline import decode_latents
    from mitune.mi.sampler import SamplingConfig, sample
    from mitune.runs.seeds import candidate_seed
    from mitune.toy.oracle import score_image
    from mitune.toy.prompts import load_toy
    from mitune.toy.world import category_of

    config, batch = SamplingConfig(guidance_scale=cfg, num_inference_steps=steps), 64
    result = {}
    for which in ("train", "val"):
        prompts = load_toy(which, per_category, SPLIT_SEED).prompts
        rows = [(p, candidate_seed(12345, p, c)) for p in prompts for c in range(images)]
        per_category_scores: dict[str, list[float]] = {}
        for start in range(0, len(rows), batch):
            texts, seeds = zip(*rows[start : start + batch])
            for text, image in zip(texts, decode_latents(pipe, sample(pipe, texts, seeds, config).latents)):
                per_category_scores.setdefault(category_of(text), []).append(score_image(text, image))
        result[which] = {c: round(float(np.mean(v)), 3) for c, v in per_category_scores.items()}
        result[which]["all"] = round(float(np.mean([x for v in per_category_scores.values() for x in v])), 3)
    return result


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
license: mit
---
# mitune toy-world base model

A {params:.1f}M-parameter Stable Diffusion pipeline in miniature (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel with a word-level tokenizer), trained from scratch by `make toy-model`
(`python -m mitune.toy.base_model`) on procedurally drawn scenes of `mitune.toy.world`. It is
mitune's embedded default model: `python -m mitune.run` runs MI-TUNE on it.

- **Data**: {num_images} (caption, 32 px image) pairs from the toy grammar (color, shape/size,
  texture, 2D-spatial and complex prompts), none binding the held-out pairings of split
  {split_seed}: (color, shape) {held_cs}, (size, shape) {held_ss}. Val prompts always bind
  one of them.
- **Training**: VAE {vae_steps} steps (batch {vae_batch}, MSE + KL {vae_kl_weight}); then UNet + text
  encoder {unet_steps} steps (batch {unet_batch}, AdamW {unet_lr}, eps-prediction, t ~ U[0, 1000),
  {caption_dropout:.0%} caption dropout for classifier-free guidance, EMA {ema_decay}); seed {seed}.
- **Time**: {minutes:.0f} min on {machine}.
- **Final losses**: VAE {vae_final_loss:.4f}, UNet {unet_final_loss:.4f}.

Oracle alignment (`mitune.toy.oracle`, exact; 1 = every named attribute and relation right),
{per_category} prompts per category x 4 images, CFG 7.5, 25 DDPM steps:

| prompts | {categories} |
|---|{dashes}
| train (seen bindings) | {train_row} |
| val (held-out bindings) | {val_row} |
"""


def model_card(pipe: StableDiffusionPipeline, record: dict) -> str:
    scores, config = record["oracle"], record["config"]
    categories = list(scores["train"])
    return MODEL_CARD.format(
        params=sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()) / 1e6,
        split_seed=record["split_seed"], held_cs=record["held_out_color_shape"], held_ss=record["held_out_size_shape"],
        minutes=record["train_seconds"] / 60, machine=record["machine"], vae_final_loss=record["vae_final_loss"],
        unet_final_loss=record["unet_final_loss"], per_category=config["card_per_category"], categories=" | ".join(categories),
        dashes="---|" * len(categories), train_row=" | ".join(f"{scores['train'][c]:.3f}" for c in categories),
        val_row=" | ".join(f"{scores['val'][c]:.3f}" for c in categories), **config,
    )


def save_model(pipe: StableDiffusionPipeline, record: dict, out: Path) -> Path:
    """Write the pipeline (safetensors), its training record and (once scored) its model card atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "model"
        pipe.save_pretrained(staged, safe_serialization=True)
        (staged / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        if "oracle" in record:
            (staged / "README.md").write_text(model_card(pipe, record))
        if out.exists():
            old = Path(tmp) / "old"
            out.rename(old)
        staged.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    for name, value in asdict(ToyTrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO)
    config = ToyTrainConfig(**args)
    pipe, record = train_toy_model(config)
    save_model(pipe, record, out)  # the weights first: the card's evaluation must not be able to lose them
    record["oracle"] = oracle_scores(pipe, config.card_per_category)
    print(f"saved {save_model(pipe, record, out)} ({record['train_seconds']:.0f} s of training)")


if __name__ == "__main__":
    main()
