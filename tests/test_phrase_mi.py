"""Per-phrase conditional MI against a two-factor Gaussian mixture, and its prompt handling.

The mixture: z0 | a, b ~ N(mu_a + mu_b, 0.4^2 I) in R^8 with three values of each factor,
mu_a = 1.5 e_{0,1,2} and mu_b = 1.2 e_{2,3,4} (they share axis 2, so knowing a changes what b
adds). "Prompt" (a, b), rest (a, NULL): the estimator must recover I(Z0; B | A) computed by
Monte Carlo (1.013 nats); the tolerance is 5 % (measured: standalone -0.03 %, fused 1000 steps
+0.8 % with Monte-Carlo SE 1.3 %; the joint I(Z0; A, B) = 2.078 nats, +0.4 %). The margin
covers Monte-Carlo noise and the schedule's discretisation, as for plain MI in tests/test_mi.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from mitune.mi.estimators import pointwise_mi, sample_with_mi
from mitune.mi.phrases import (
    min_phrase_mi,
    phrase_mi,
    prompt_phrases,
    rest_embeddings,
    rest_prompt,
    sample_with_phrase_mi,
)
from mitune.mi.pipeline import ddpm_scheduler, encode_prompts, null_embedding, unet_eps_fn
from mitune.models.builders import SD_DDPM_CONFIG
from mitune.models.loading import load_pipeline
from mitune.rounds.loop import run_round
from mitune.rounds.settings import GenerationConfig
from mitune.toy.gmm import NULL_CLASS, TwoFactorMixture

TWO = TwoFactorMixture(mu_a=1.5 * torch.eye(8)[[0, 1, 2]], mu_b=1.2 * torch.eye(8)[[2, 3, 4]], std=0.4)
SHAPE = (2, 2, 2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def without(factors: torch.Tensor, which: int) -> torch.Tensor:
    out = factors.clone()
    out[:, which] = NULL_CLASS
    return out


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def truth() -> dict[str, float]:
    b_given_a = TWO.true_conditional_mi(1_000_000, seeded(0))
    joint = TWO.joint.true_mi(1_000_000, seeded(0))
    assert 0.8 < b_given_a < joint - 0.8  # B adds much given A, and A carries much on its own
    return {"b_given_a": b_given_a, "joint": joint}


def test_standalone_conditional_mi_recovers_the_truth(truth):
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    z0, factors = TWO.sample(32768, seeded(1))
    mi = pointwise_mi(TWO.eps_fn(scheduler.alphas_cumprod), z0.view(-1, *SHAPE), factors, without(factors, 1),
                      scheduler, n_draws=16, generator=seeded(2))
    assert (mi >= 0).all()
    assert mi.mean().item() == pytest.approx(truth["b_given_a"], rel=0.05)


def test_fused_phrase_mi_1000_steps_recovers_the_truth(truth):
    """Guidance 1 samples p(z0 | a, b); along the chain, the gap to the rest prompt gives
    I(Z0; B | A) and the gap to the null prompt I(Z0; A, B), with the same samples as
    ``sample_with_mi``."""
    scheduler = DDPMScheduler(**{**SD_DDPM_CONFIG, "steps_offset": 0})
    eps_fn = TWO.eps_fn(scheduler.alphas_cumprod)
    gen = seeded(3)
    factors = TWO.sample(8192, gen)[1]
    z_T = torch.randn(8192, *SHAPE, generator=gen)
    null = torch.full_like(factors, NULL_CLASS)
    z, mi, per_phrase = sample_with_phrase_mi(eps_fn, z_T, factors, null, [without(factors, 1)], scheduler,
                                              num_inference_steps=1000, guidance_scale=1.0, generator=seeded(4))
    assert per_phrase.shape == (8192, 1)
    assert per_phrase.mean().item() == pytest.approx(truth["b_given_a"], rel=0.05)
    assert mi.mean().item() == pytest.approx(truth["joint"], rel=0.05)
    accuracy = (TWO.joint.classify(z.flatten(1)) == factors[:, 0] * 3 + factors[:, 1]).float().mean().item()
    assert accuracy > 0.95  # the chains land on their (a, b) pair: the match is not vacuous
    z_plain, mi_plain = sample_with_mi(eps_fn, z_T[:64], factors[:64], null[:64], scheduler,
                                       num_inference_steps=50, guidance_scale=4.0, generator=seeded(5))
    z_phr, mi_phr, _ = sample_with_phrase_mi(eps_fn, z_T[:64], factors[:64], null[:64], [without(factors[:64], 1)],
                                             scheduler, num_inference_steps=50, guidance_scale=4.0, generator=seeded(5))
    assert torch.equal(z_plain, z_phr) and torch.equal(mi_plain, mi_phr)


def test_rest_prompt_cuts_the_phrase_and_dangling_joiners():
    assert rest_prompt("a red square and a yellow circle", "a red square") == "a yellow circle"
    assert rest_prompt("a red square and a yellow circle", "a yellow circle") == "a red square"
    assert rest_prompt("a red square and a yellow circle", "yellow") == "a red square and a circle"
    assert rest_prompt("a cat on the left of a dog", "a dog") == "a cat on the left of"
    assert rest_prompt("a red cube", "a red cube") == ""  # the rest of a one-phrase prompt is the null prompt
    assert rest_prompt("a cat, a dog and a bird", "a dog") == "a cat, and a bird"
    with pytest.raises(ValueError, match="'red' is not in prompt"):
        rest_prompt("a reddish cube", "red")


def test_prompt_phrases_defaults_to_noun_phrases_and_names_unknown_ones():
    assert prompt_phrases("a red square and a yellow circle", use_spacy=False) == ["a red square", "a yellow circle"]
    assert prompt_phrases("a red square and a yellow circle", ["yellow"]) == ["yellow"]
    with pytest.raises(ValueError, match="unknown phrase 'a blue ball'.*noun phrases"):
        prompt_phrases("a red square and a yellow circle", ["a blue ball"], use_spacy=False)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        prompt_phrases("  ")
    with pytest.raises(ValueError, match="phrases is empty"):
        prompt_phrases("a red square", [])


def test_phrase_mi_of_the_whole_prompt_is_plain_mi(tiny_sd_path):
    """A one-phrase prompt's rest is the empty prompt, i.e. the null prompt: same generators, same MI."""
    pipe = load_pipeline(str(tiny_sd_path))
    latents = torch.randn(3, 4, 8, 8, generator=seeded(6))
    prompt = "a red cube"
    both = phrase_mi(pipe, latents, "a red cube and a blue ball", n_draws=2)
    assert both.shape == (3, 2) and (both >= 0).all()
    whole = phrase_mi(pipe, latents, prompt, [prompt], n_draws=4, seed=1)
    generators = [torch.Generator().manual_seed(1 * 1_000_003 + i) for i in range(3)]
    plain = pointwise_mi(unet_eps_fn(pipe), latents, encode_prompts(pipe, [prompt] * 3), null_embedding(pipe, 3),
                         ddpm_scheduler(pipe), n_draws=4, generator=generators)
    torch.testing.assert_close(whole[:, 0], plain)


def test_rest_embeddings_pad_short_prompts_and_min_ignores_the_padding(tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    prompts = ["a red square and a yellow circle", "a blue car"]
    rests, valid = rest_embeddings(pipe, prompts, [prompt_phrases(p) for p in prompts])
    assert len(rests) == 2 and valid.tolist() == [[True, True], [True, False]]
    expected = encode_prompts(pipe, ["a yellow circle", "", "a red square", "a blue car"])
    torch.testing.assert_close(torch.cat(rests), expected)
    per_phrase = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    assert min_phrase_mi(per_phrase, valid).tolist() == [1.0, 2.0]


def test_generation_round_selects_by_the_smallest_phrase_mi(tiny_sd_path, tmp_path):
    """selection=phrase_mi: same samples and MI as a plain round (the rest prompts only add UNet
    rows), scores are the smallest phrase MI, and the top score is selected."""
    pipe = load_pipeline(str(tiny_sd_path))
    prompts = ["a red apple and a green book", "a blue car"]
    config = GenerationConfig(num_candidates=3, top_k=1, num_inference_steps=3, micro_batch=4)
    plain = run_round(pipe, prompts, config, tmp_path / "plain", progress=False).path
    phrased = run_round(pipe, prompts, replace(config, selection="phrase_mi"), tmp_path / "phrase", progress=False)
    rows = [json.loads(line) for line in (phrased.path / "metadata.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (plain / "metadata.jsonl").read_text().splitlines()]
    assert [r["mi"] for r in rows] == pytest.approx([r["mi"] for r in plain_rows], rel=1e-4)
    for pid in range(2):
        mine = [r for r in rows if r["prompt_id"] == pid]
        assert [r["selected"] for r in mine] == [r["score"] == max(m["score"] for m in mine) for r in mine]
    one_phrase = [r for r in rows if r["prompt"] == "a blue car"]
    assert [r["score"] for r in one_phrase] == pytest.approx([r["mi"] for r in one_phrase], rel=1e-4)  # rest = ""
    assert all(r["score"] != pytest.approx(r["mi"], rel=1e-3) for r in rows if r["prompt_id"] == 0)
    with pytest.raises(ValueError, match="'it is' has no noun phrase"):
        run_round(pipe, ["it is"], replace(config, selection="phrase_mi"), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="save_mi_maps is not available with selection=phrase_mi"):
        replace(config, selection="phrase_mi", save_mi_maps=True)
