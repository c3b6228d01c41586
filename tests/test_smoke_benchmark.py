"""The full-size builders have the real architectures and tokenizers (checked on meta tensors, no memory),
and benchmarks/smoke.py's report has its keys (on the tiny pipeline, in seconds)."""

import json

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mitune.models import builders

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-large-patch14's ids of "a photo of a cat"


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("build, expected", [
    (lambda: UNet2DConditionModel(**builders.SD21_BASE_UNET), 865_910_724),  # stable-diffusion-2-1-base unet
    (lambda: UNet2DConditionModel(**builders.SDXL_BASE_UNET), 2_567_463_684),  # stable-diffusion-xl-base-1.0 unet
    (lambda: AutoencoderKL(**builders.SD_VAE), 83_653_863),  # both VAEs
    (lambda: CLIPTextModel(CLIPTextConfig(**builders.SD21_TEXT_ENCODER)), 340_387_840),  # ViT-H text, 23 layers
    (lambda: CLIPTextModel(CLIPTextConfig(**builders.SDXL_TEXT_ENCODER)), 123_060_480),  # CLIP ViT-L/14 text
    (lambda: CLIPTextModelWithProjection(CLIPTextConfig(**builders.SDXL_TEXT_ENCODER_2)), 694_659_840),  # bigG
], ids=["sd21_unet", "sdxl_unet", "vae", "sd21_text", "sdxl_text", "sdxl_text_2"])
def test_full_size_components_have_the_real_parameter_counts(build, expected):
    with init_empty_weights():
        assert _params(build()) == expected


@pytest.mark.parametrize("pad, pad_id", [("!", 0), ("<|endoftext|>", 49407)])
def test_clip_tokenizer_gives_clips_ids_and_pads_as_the_real_ones(pad, pad_id):
    tokenizer = builders.clip_tokenizer(pad)
    assert len(tokenizer) == builders.CLIP_VOCAB_SIZE
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    assert ids == CAT + [pad_id] * (77 - len(CAT))
    assert tokenizer.pad_token_id == pad_id
    long = tokenizer(" ".join(["cat"] * 100), max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407


@pytest.mark.slow
def test_smoke_driver_reports_every_stage_on_the_tiny_sdxl(load_benchmark, tmp_path):
    """The driver of `make smoke-sd21` / `smoke-sdxl`, on the tiny SDXL: both tasks run, the report has its keys."""
    report = load_benchmark("smoke").main(["tiny-sdxl", "--out", str(tmp_path)])
    assert report["stages"] == ["generate", "train", "evaluate"]
    assert set(report["params"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(report["tokenizer_ids"]) == {"tokenizer", "tokenizer_2"}
    assert report["wall_s"] > 0 and report["peak_rss_gib"] > 0
    assert json.loads((tmp_path / "tiny-sdxl" / "report.json").read_text()) == report


@pytest.mark.parametrize("kind", sorted(builders.FULL_BUILDERS))
def test_full_builders_make_the_real_pipelines(kind):
    """Every component constructs (weights on meta): the schedulers' and tokenizers' real settings included."""
    with init_empty_weights():
        pipe = builders.FULL_BUILDERS[kind]()
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == {"sd21": 512, "sdxl": 1024}[kind]
    if kind == "sdxl":
        assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
        assert pipe.config.force_zeros_for_empty_prompt and pipe.vae.config.force_upcast
