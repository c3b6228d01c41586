"""``sample_with_mi`` on a pipeline's UNet reproduces the diffusers pipeline, with no extra UNet call."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from mitune.mi.estimators import sample_with_mi
from mitune.mi.pipeline import ddpm_scheduler, decode_latents, encode_prompts, latent_shape, null_embedding, unet_eps_fn
from mitune.models.loading import load_pipeline

PROMPTS = ["a green bench and a blue bowl", "a cat on the left of a dog", "a red cube"]
SEEDS = [11, 12, 13]
STEPS = 10
GUIDANCE = 7.5


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def initial_noise(pipe) -> torch.Tensor:
    return torch.randn(latent_shape(pipe, len(PROMPTS)), generator=torch.Generator().manual_seed(0))


@contextmanager
def count_unet_calls(pipe):
    """Batch size of every UNet forward while the block runs."""
    batches = []

    def record(module, args, kwargs, output):
        batches.append((args[0] if args else kwargs["sample"]).shape[0])

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    try:
        yield batches
    finally:
        handle.remove()


def run_mitune(pipe, z_T):
    with count_unet_calls(pipe) as calls:
        z, mi = sample_with_mi(
            unet_eps_fn(pipe),
            z_T,
            encode_prompts(pipe, PROMPTS),
            null_embedding(pipe, len(PROMPTS)),
            ddpm_scheduler(pipe),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=generators(),
            last_step_noise=True,  # diffusers' sampler adds noise at its last step (t=1 > 0)
        )
    return z, mi, decode_latents(pipe, z), calls


def run_diffusers(pipe, z_T, scheduler: DDPMScheduler):
    """The pipeline's own loop; its final latents are taken from the step-end callback."""
    pipe.scheduler = scheduler
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final.update(kwargs)
        return kwargs

    with count_unet_calls(pipe) as calls:
        images = pipe(
            PROMPTS,
            latents=z_T,
            generator=generators(),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="pil",
            callback_on_step_end=keep_latents,
        ).images
    return final["latents"], images, calls


def assert_same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_sampling_with_mi_reproduces_the_diffusers_pipeline(fixture, request):
    pipe = load_pipeline(str(request.getfixturevalue(fixture)))
    pipe.set_progress_bar_config(disable=True)
    z_T = initial_noise(pipe)

    z, mi, images, our_calls = run_mitune(pipe, z_T)
    z_ref, images_ref, their_calls = run_diffusers(pipe, z_T, ddpm_scheduler(pipe))

    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-5)
    assert_same_images(images, images_ref)
    assert our_calls == their_calls == [2 * len(PROMPTS)] * STEPS
    assert mi.shape == (len(PROMPTS),) and (mi > 0).all()


def test_v_prediction_unet_is_converted_to_eps(tiny_sd_path):
    """A v-prediction UNet through ``unet_eps_fn`` samples what diffusers' v-prediction DDPM does."""
    pipe = load_pipeline(str(tiny_sd_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    z_T = initial_noise(pipe)

    z, _, _, _ = run_mitune(pipe, z_T)
    z_ref, _, _ = run_diffusers(pipe, z_T, v_scheduler)

    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)


def test_sdxl_fp16_vae_is_upcast_for_decoding_and_restored(tiny_sdxl_path):
    pipe = load_pipeline(str(tiny_sdxl_path))
    latents = initial_noise(pipe)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    images = decode_latents(pipe, latents)
    assert pipe.vae.dtype == torch.float16
    pipe.vae.to(torch.float32)  # what StableDiffusionXLPipeline.upcast_vae does
    assert_same_images(images, decode_latents(pipe, latents))
