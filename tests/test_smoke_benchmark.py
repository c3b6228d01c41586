"""The full-size builders have the real architectures and tokenizers (checked on meta tensors, no memory),
and benchmarks/smoke.py's report has its keys (on the tiny pipeline, in seconds)."""

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
