"""Contrastive MI (issue #31): MI with the prompt minus MI with swapped prompts, from shared draws.

Ground truth on tests/test_mi.py's Gaussian mixture (exact denoiser): the likelihood contrast is the
log-likelihood ratio log p(z0 | k) - mean_j log p(z0 | j), known in closed form at t = 0; a prompt that
carries nothing the image's own does not (a class with the same mean) contrasts to exactly 0 with shared draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from mitune.metrics import MetricInputError, build_alignment_metric
from mitune.metrics.mi import ATTRIBUTE_SWAPS, contrast_prompts, image_digest
from mitune.mi.estimators import contrastive_mi, pointwise_mi
from mitune.models.builders import SD_DDPM_CONFIG
from mitune.runs.seeds import mix_seed
from mitune.toy.gmm import NULL_CLASS, GaussianMixture

MEANS = 1.5 * torch.eye(8)[:4]
MIXTURE = GaussianMixture(means=MEANS, std=0.4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: one torch thread


def gmm_contrast(mixture: GaussianMixture, n: int, estimator: str, shifts=(1, 2, 3), timestep_sampling="uniform"):
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    z0, labels = mixture.sample(n, seeded(0))
    others = [(labels + j) % mixture.num_classes for j in shifts]
    own, other = contrastive_mi(mixture.eps_fn(scheduler.alphas_cumprod), z0.view(n, 2, 2, 2), labels, others,
                                torch.full_like(labels, NULL_CLASS), scheduler, n_draws=64,
                                generator=[seeded(1000 + i) for i in range(n)], estimator=estimator,
                                timestep_sampling=timestep_sampling)
    return z0, labels, others, own, other


@pytest.mark.parametrize("timestep_sampling", ["uniform", "importance"])
def test_likelihood_contrast_is_the_log_likelihood_ratio_of_the_mixture(timestep_sampling):
    z0, labels, others, own, other = gmm_contrast(MIXTURE, 512, "likelihood", timestep_sampling=timestep_sampling)
    logits = (z0 @ MEANS.T - 0.5 * MEANS.pow(2).sum(1)) / MIXTURE.std**2  # log p(z0 | k) + const
    truth = logits.gather(1, labels[:, None])[:, 0] - torch.stack([logits.gather(1, o[:, None])[:, 0]
                                                                  for o in others], 1).mean(1)
    contrast = own - other.mean(1)
    assert truth.mean().item() == pytest.approx(14.06, rel=0.05)  # ||mu_k - mu_j||^2 / (2 s^2)
    assert contrast.mean().item() == pytest.approx(truth.mean().item(), rel=0.05)
    assert (contrast > 0).float().mean().item() > 0.99
    assert torch.corrcoef(torch.stack([contrast, truth]))[0, 1].item() > 0.8


def test_standalone_contrast_of_a_matching_image_is_negative_on_the_mixture():
    """Eq. 2's ||eps_p - eps_null||^2 is largest for a prompt the image contradicts: documented, not a bug."""
    _, _, _, own, other = gmm_contrast(MIXTURE, 256, "standalone")
    assert (own - other.mean(1)).mean().item() < -5 and (own < other.mean(1)).float().mean().item() > 0.95


@pytest.mark.parametrize("estimator", ["standalone", "likelihood"])
def test_an_uninformative_prompt_contrasts_to_exactly_zero_with_shared_draws(estimator):
    """Classes 0 and 1 share a mean: the other prompt says what the own one says, so every draw cancels."""
    twins = GaussianMixture(means=torch.stack([MEANS[0], MEANS[0], MEANS[2], MEANS[3]]), std=0.4)
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    z0, _ = twins.sample(64, seeded(0))
    labels = torch.zeros(64, dtype=torch.long)
    own, other = contrastive_mi(twins.eps_fn(scheduler.alphas_cumprod), z0, labels, [labels + 1, labels + 2],
                                torch.full_like(labels, NULL_CLASS), scheduler, n_draws=8,
                                generator=[seeded(i) for i in range(64)], estimator=estimator)
    assert torch.equal(own, other[:, 0]) and not torch.allclose(own, other[:, 1])


def test_standalone_terms_are_pointwise_mi_with_the_same_draws():
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    eps_fn = MIXTURE.eps_fn(scheduler.alphas_cumprod)
    z0, labels = MIXTURE.sample(16, seeded(0))
    others = [(labels + 1) % 4, (labels + 2) % 4]
    null = torch.full_like(labels, NULL_CLASS)
    own, other = contrastive_mi(eps_fn, z0, labels, others, null, scheduler, n_draws=4,
                                generator=[seeded(i) for i in range(16)])
    by_hand = [pointwise_mi(eps_fn, z0, emb, null, scheduler, n_draws=4, generator=[seeded(i) for i in range(16)])
               for emb in (labels, *others)]
    torch.testing.assert_close(own, by_hand[0])
    torch.testing.assert_close(other, torch.stack(by_hand[1:], 1))


def test_contrast_prompts_swap_one_attribute_and_cover_the_toy_grammar():
    from mitune.toy.world import COLORS, RELATIONS, SHAPES, SIZES, TEXTURES

    assert ATTRIBUTE_SWAPS == (COLORS, SHAPES, TEXTURES, SIZES, RELATIONS)
    variants = contrast_prompts("a big red circle on the left of a blue square")
    assert "a big green circle on the left of a blue square" in variants
    assert "a big red circle below a blue square" in variants
    assert "a small red circle on the left of a blue square" in variants
    assert "a big red circle on the left of a blue circle" in variants
    assert len(variants) == 1 + 5 + 2 + 3 + 5 + 2  # size, colour, shape, relation, colour, shape
    assert contrast_prompts("a cat on a mat") == []


def test_prompts_without_enough_swaps_are_refused_before_scoring():
    metric = build_alignment_metric("mi_contrast", contrasts=4, progress=False)  # no pipeline needed to check
    metric.check_prompts(["a red circle"])
    with pytest.raises(MetricInputError, match="'a cat on a mat' has 0 one-attribute swaps"):
        metric.check_prompts(["a red circle", "a cat on a mat"])
    with pytest.raises(MetricInputError, match="mi_contrast has no pipeline"):
        metric.score([Image.new("RGB", (32, 32))], ["a red circle"])
    with pytest.raises(ValueError, match="estimator must be one of"):
        build_alignment_metric("mi_contrast", estimator="nope")
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        build_alignment_metric("mi_contrast", timestep_sampling="nope")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_metric_is_own_minus_mean_other_mi_from_the_same_draws_and_deterministic(tiny_sd_path):
    metric = build_alignment_metric("mi_contrast_standalone", pipeline=str(tiny_sd_path), contrasts=3, n_draws=2,
                                    batch_size=2, progress=False)
    pics, prompts = images(3), ["a red square", "a blue circle", "a red square"]
    scores = metric.score(pics, prompts)
    assert torch.equal(scores, metric.score(pics, prompts))  # deterministic
    mi = build_alignment_metric("mi", pipeline=metric.pipe, n_draws=2, progress=False)
    latents = mi.encode(pics)
    for i, (image, prompt) in enumerate(zip(pics, prompts)):
        seed = mix_seed(0, prompt, image_digest(image))
        by_prompt = [mi._mi(latents[i:i + 1], [p], [seed]).item() for p in [prompt, *metric.others(prompt)]]
        assert scores[i].item() == pytest.approx(by_prompt[0] - np.mean(by_prompt[1:]), rel=1e-4, abs=1e-6)
    assert metric.others("a red square") == metric.others("a red square") and len(set(metric.others("a red square"))) == 3
    likelihood = build_alignment_metric("mi_contrast", pipeline=metric.pipe, contrasts=3, n_draws=2, progress=False)
    alone = torch.cat([likelihood.score([im], [p]) for im, p in zip(pics, prompts)])
    torch.testing.assert_close(likelihood.score(pics, prompts), alone)  # independent of the batch
    assert not torch.allclose(alone, scores)


def test_selection_scores_under_the_rounds_model(tiny_sd_path):
    from mitune.models import load_pipeline
    from mitune.rounds.selection import check_strategy, selection_scores

    check_strategy("mi_contrast", ["a red circle"])
    with pytest.raises(ValueError, match="selection=mi_contrast: .*'a cat on a mat' has 0"):
        check_strategy("mi_contrast", ["a cat on a mat"])
    with pytest.raises(ValueError, match="selection=mi_contrast scores under the round's model"):
        selection_scores("mi_contrast", "a red circle", images(2), torch.zeros(2), seeded(0))
    pipe = load_pipeline(str(tiny_sd_path))
    scores = selection_scores("mi_contrast", "a red circle", images(2), torch.zeros(2), seeded(0), pipe=pipe)
    expected = build_alignment_metric("mi_contrast", pipeline=pipe, progress=False).score(images(2), ["a red circle"] * 2)
    torch.testing.assert_close(scores, expected)


def test_a_round_selected_by_mi_contrast_ranks_by_its_score_under_the_rounds_model(tiny_sd_path, tmp_path):
    from mitune.models import load_pipeline
    from mitune.rounds.loop import run_round
    from mitune.rounds.settings import GenerationConfig

    pipe = load_pipeline(str(tiny_sd_path))
    config = GenerationConfig(num_candidates=3, top_k=1, num_inference_steps=2, micro_batch=8, selection="mi_contrast")
    out = run_round(pipe, ["a red square"], config, tmp_path / "round_1", progress=False)
    rows = out.rows()
    pics = [Image.open(out.path / r["file_name"]).convert("RGB") for r in rows]
    expected = build_alignment_metric("mi_contrast", pipeline=pipe, progress=False).score(pics, ["a red square"] * 3)
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-6)
    assert [r["selected"] for r in rows] == [i == int(expected.argmax()) for i in range(3)]
