"""Standard error of standalone MI with uniform vs importance-sampled timesteps (docs/mi/variance.md).

Same latents, same number of draws (so the same UNet rows) for every sampler; the per-latent
standard error of one estimate is sqrt(E[(a - b)^2] / 2) over two independent estimates a, b.
Samplers: ``uniform`` (the default), ``importance`` with the model-free logistic proposal, and
``importance`` with a proposal calibrated on separate pilot latents (``calibrated_proposal``;
its one-off pilot is not counted). Cases: eight Gaussian mixtures (exact denoiser, the first four
are tests/test_mi.py's and tests/test_phrase_mi.py's kind) and the toy model on toy prompts.

    python benchmarks/mi_variance.py [--toy-prompts 5] [--toy-draws 32] [--out docs/mi/variance.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from scipy.stats import spearmanr

from mitune.mi.estimators import calibrated_proposal, pointwise_mi
from mitune.mi.pipeline import ddpm_scheduler, encode_prompts, null_embedding, unet_eps_fn
from mitune.models.builders import SD_DDPM_CONFIG
from mitune.models.loading import load_pipeline
from mitune.rerank import RerankConfig
from mitune.runs import io as mio
from mitune.runs.seeds import candidate_seed
from mitune.toy.base_model import MODEL_DIR
from mitune.toy.gmm import NULL_CLASS, GaussianMixture
from mitune.toy.prompts import load_toy

SAMPLERS = ("uniform", "logistic", "calibrated")


def mixtures() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(5)
    return {
        "4 classes, d=8, std 0.4 (tests)": GaussianMixture(1.5 * torch.eye(8)[:4], 0.4),
        "2 close classes, std 1": GaussianMixture(torch.tensor([[0.3] + [0.0] * 7, [-0.3] + [0.0] * 7]), 1.0),
        "10 classes, d=16, std 0.1": GaussianMixture(3 * torch.eye(16)[:10], 0.1),
        "3 classes on 3 of 8 dims": GaussianMixture(1.5 * torch.eye(8)[[0, 3, 5]], 0.4),
        "6 random classes, d=32": GaussianMixture(torch.randn(6, 32, generator=g) * 0.5, 0.6),
        "2 far classes": GaussianMixture(torch.tensor([[2.0] * 4, [-2.0] * 4]), 0.5),
        "20 random classes, d=64": GaussianMixture(torch.randn(20, 64, generator=g), 1.0),
        "5 random classes, std 0.05": GaussianMixture(torch.randn(5, 8, generator=g), 0.05),
    }


def compare(estimate: Callable[[str, int, torch.Tensor | None], torch.Tensor], proposal: torch.Tensor
            ) -> dict[str, tuple[float, float, float]]:
    """Per sampler: (mean MI, per-latent SE, Spearman of the two runs)."""
    out = {}
    for sampler in SAMPLERS:
        mode = "uniform" if sampler == "uniform" else "importance"
        q = proposal if sampler == "calibrated" else None
        a, b = estimate(mode, 2, q), estimate(mode, 3, q)
        se = ((a - b).pow(2).mean() / 2).sqrt().item()
        out[sampler] = (torch.cat([a, b]).mean().item(), se, float(spearmanr(a, b).statistic))
    return out


def mixture_rows(n: int, draws: int) -> list[str]:
    scheduler = ddpm_scheduler_sd()
    rows = []
    for name, mixture in mixtures().items():
        eps_fn = mixture.eps_fn(scheduler.alphas_cumprod)
        pilot, pilot_labels = mixture.sample(256, torch.Generator().manual_seed(9))
        proposal = calibrated_proposal(eps_fn, pilot, pilot_labels, torch.full_like(pilot_labels, NULL_CLASS),
                                       scheduler, n_draws=16, generator=torch.Generator().manual_seed(10))
        z0, labels = mixture.sample(n, torch.Generator().manual_seed(1))
        null = torch.full_like(labels, NULL_CLASS)

        def estimate(mode: str, seed: int, q: torch.Tensor | None) -> torch.Tensor:
            return pointwise_mi(eps_fn, z0, labels, null, scheduler, n_draws=draws,
                                generator=torch.Generator().manual_seed(seed), timestep_sampling=mode, proposal=q)

        rows.append(table_row(name, compare(estimate, proposal)))
    return rows


def ddpm_scheduler_sd():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_DDPM_CONFIG)


def toy_row(num_prompts: int, per_prompt: int, draws: int) -> str:
    """The toy model's own samples (8 per prompt), MI by each sampler; the pilot is other prompts."""
    pipe = load_pipeline(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    from mitune.mi.sampler import sample

    prompts = load_toy("val", 4).prompts[:: max(1, 20 // num_prompts)][:num_prompts]
    pilot_prompt = load_toy("train", 1).prompts[0]
    latents, texts = [], []
    config = RerankConfig(n=per_prompt, num_inference_steps=25)
    for text in [pilot_prompt, *prompts]:
        seeds = [candidate_seed(0, text, c) for c in range(per_prompt)]
        latents.append(sample(pipe, [text] * per_prompt, seeds, config.sampling).latents)
        texts += [text] * per_prompt
    z0 = torch.cat(latents)
    emb, null = encode_prompts(pipe, texts), null_embedding(pipe, len(texts))
    scheduler, eps_fn = ddpm_scheduler(pipe), unet_eps_fn(pipe)
    pilot = slice(0, per_prompt)
    proposal = calibrated_proposal(eps_fn, z0[pilot], emb[pilot], null[pilot], scheduler, n_draws=draws,
                                   generator=torch.Generator().manual_seed(10))
    rest = slice(per_prompt, None)

    def estimate(mode: str, seed: int, q: torch.Tensor | None) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(z0[rest]))]
        return pointwise_mi(eps_fn, z0[rest], emb[rest], null[rest], scheduler, n_draws=draws, generator=generators,
                            timestep_sampling=mode, proposal=q)

    return table_row(f"toy model, {num_prompts} prompts x {per_prompt} samples", compare(estimate, proposal))


def table_row(name: str, result: dict[str, tuple[float, float, float]]) -> str:
    se_uniform = result["uniform"][1]
    cells = [f"{result['uniform'][0]:.3f}", f"{se_uniform:.4f}"]
    for sampler in SAMPLERS[1:]:
        cells.append(f"{result[sampler][0]:.3f}")
        cells.append(f"{result[sampler][1] / se_uniform:.2f}")
    cells += [f"{result[s][2]:.2f}" for s in SAMPLERS]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=2048, help="latents per mixture")
    parser.add_argument("--draws", type=int, default=16, help="draws (t, eps) per latent")
    parser.add_argument("--toy-prompts", type=int, default=5)
    parser.add_argument("--toy-samples", type=int, default=8)
    parser.add_argument("--toy-draws", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/mi/variance.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = mixture_rows(args.latents, args.draws)
    if args.toy_prompts > 0:
        rows.append(toy_row(args.toy_prompts, args.toy_samples, args.toy_draws))
    command = "python benchmarks/mi_variance.py " + shlex.join(sys.argv[1:])
    header = ("| case | MI, uniform | SE/latent, uniform | MI, logistic | SE ratio, logistic | MI, calibrated | "
              "SE ratio, calibrated | Spearman of 2 runs: uniform | logistic | calibrated |")
    report = (
        "# Standalone MI: uniform vs importance-sampled timesteps\n\n"
        f"`{command.strip()}`. Mixtures: {args.latents} latents, {args.draws} draws each; toy model: "
        f"{args.toy_draws} draws each. SE ratio = per-latent standard error / uniform's at the same UNet rows "
        "(below 1: better). Spearman: rank agreement of two independent runs on the same latents.\n\n"
        f"{header}\n|---|" + "---|" * 9 + "\n" + "\n".join(rows) + "\n"
    )
    mio.write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
