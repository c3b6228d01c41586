"""The committed toy base model (the embedded default) and its training recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mitune.mi.pipeline import decode_latents
from mitune.models.loading import load_pipeline
from mitune.rounds.generation import generate_batch, make_jobs
from mitune.rounds.settings import GenerationConfig
from mitune.toy import base_model
from mitune.toy.base_model import MODEL_DIR, SPLIT_SEED, ToyTrainConfig, complete_scene, training_pairs
from mitune.toy.oracle import detect, score
from mitune.toy.prompts import load_toy
from mitune.toy.world import Obj, parse, sample_scene, split_prompts


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline(str(MODEL_DIR))


def generate(pipe, prompts, n=2, steps=25, cfg=7.5):
    config = GenerationConfig(num_candidates=n, guidance_scale=cfg, num_inference_steps=steps, micro_batch=64)
    latents = generate_batch(pipe, prompts, make_jobs(prompts, config), config).latents
    return [np.asarray(im) for im in decode_latents(pipe, latents)]


def test_committed_model_matches_its_record_and_architecture(toy_pipe):
    record = json.loads((MODEL_DIR / "training.json").read_text())
    split = split_prompts(SPLIT_SEED, 0, 0)
    assert record["held_out_color_shape"] == sorted(map(list, split.held_out_color_shape))
    assert record["held_out_size_shape"] == sorted(map(list, split.held_out_size_shape))
    fresh = base_model.build_toy_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(toy_pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    assert (MODEL_DIR / "README.md").is_file()
    assert toy_pipe.tokenizer.model_max_length == base_model.MAX_LENGTH
    assert toy_pipe.tokenizer.unk_token_id not in toy_pipe.tokenizer(load_toy("val", 6).prompts).input_ids[0]


def test_committed_model_renders_objects_and_is_deterministic(toy_pipe):
    prompts = load_toy("train", 2).prompts
    images = generate(toy_pipe, prompts)
    assert images[0].shape == (32, 32, 3)
    assert np.array_equal(images[0], generate(toy_pipe, prompts[:1])[0])
    # Measured when committed: 50% of these images show as many objects as the prompt names and
    # the mean oracle score is 0.51. The random-init toy architecture draws one blob per image
    # (20%, oracle 0.03), so both thresholds separate a trained model from an untrained one.
    counts = [len(detect(im)) == len(parse(p).objects) for p, im in zip(np.repeat(prompts, 2), images)]
    assert np.mean(counts) >= 0.4, counts
    assert np.mean([score(p, im) for p, im in zip(np.repeat(prompts, 2), images)]) > 0.3


def test_training_scenes_never_bind_a_held_out_pairing():
    """Not in the caption, and not through an attribute the caption leaves open either."""
    split = split_prompts(SPLIT_SEED, 0, 0)
    captions, images = training_pairs(split, 400, seed=1)
    assert len(captions) == len(images) == 400
    assert not any(split.is_held_out(o) for c in captions for o in parse(c).objects)
    drawn = [Obj(d.shape, d.color, d.size) for image in images for d in detect(image)]
    assert len(drawn) == sum(len(parse(c).objects) for c in captions)
    assert not any(split.is_held_out(o) for o in drawn)
    rng = np.random.default_rng(0)
    open_scene = sample_scene("shape", rng)  # sizes named, colors open
    assert all(o.color and o.texture == "solid" for o in complete_scene(open_scene, split, rng).objects)


def test_constant_ema_is_the_constant_decay_lerp():
    """diffusers' EMAModel as configured equals ema <- lerp(ema, param, 1 - decay) from the first step, the
    update the committed model was trained with; its default decay (1 + s) / (10 + s) stays below 0.999
    for 9k steps, longer than the whole 3000-step run."""
    decay = ToyTrainConfig().ema_decay
    torch.manual_seed(0)
    params = list(torch.nn.Linear(16, 8).parameters())
    reference = [p.detach().clone() for p in params]
    ema = base_model.constant_ema(params, decay)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(500):
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
            torch._foreach_lerp_(reference, [p.detach() for p in params], 1 - decay)
            ema.step(params)
    for shadow, expected in zip(ema.shadow_params, reference):
        torch.testing.assert_close(shadow, expected)
    ema.copy_to(params)
    for p, expected in zip(params, reference):
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.slow
def test_recipe_trains_and_saves_a_loadable_pipeline(tmp_path):
    config = ToyTrainConfig(num_images=64, vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=4, warmup_steps=1, threads=1,
                           card_per_category=1)
    pipe, record = base_model.train_toy_model(config)
    out = base_model.save_model(pipe, record, tmp_path / "model")
    assert not (out / "README.md").exists()  # weights are saved before the card's evaluation
    record["oracle"] = base_model.oracle_scores(pipe, config.card_per_category)
    base_model.save_model(pipe, record, out)
    again = load_pipeline(str(out))
    assert json.loads((out / "training.json").read_text())["config"]["unet_steps"] == 3
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor != 0.18215
    card = (out / "README.md").read_text()
    assert "| train (seen bindings) |" in card and f"{record['oracle']['val']['all']:.3f}" in card
