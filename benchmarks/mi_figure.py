"""The picture in docs/mi.md: MI maps and per-phrase MI of toy-model samples.

For a few toy prompts, the committed toy base model samples candidates (25 DDPM steps, CFG 7.5)
with MI maps and per-phrase conditional MI fused into sampling; the figure shows each image,
its MI map over it and a bar chart of its phrase MI.

    python benchmarks/mi_figure.py [--out docs/mi/toy_maps.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from matplotlib.figure import Figure

from mitune.mi.estimators import sample_with_mi
from mitune.mi.maps import overlay
from mitune.mi.phrases import phrase_embeddings, prompt_phrases, sample_with_phrase_mi
from mitune.mi.pipeline import (
    ddpm_scheduler,
    decode_latents,
    index_embedding,
    latent_shape,
    null_embedding,
    unet_eps_fn,
)
from mitune.models.loading import load_pipeline
from mitune.runs import io as mio
from mitune.runs.seeds import candidate_seed
from mitune.toy.base_model import MODEL_DIR
from mitune.toy.oracle import score_image

PROMPTS = ("a red square and a yellow circle", "a big striped blue triangle on the left of a small green circle")
PER_PROMPT = 3
STEPS, GUIDANCE = 25, 7.5


def sample(pipe, prompt: str) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Images, MI, MI maps and phrase MI of PER_PROMPT candidates (the same samples twice:
    once with maps, once with phrase MI; both samplers draw the same chain)."""
    phrases = prompt_phrases(prompt)
    generators = lambda: [torch.Generator().manual_seed(candidate_seed(0, prompt, c)) for c in range(PER_PROMPT)]
    z_T = randn_tensor(latent_shape(pipe, PER_PROMPT), generator=generators(), dtype=torch.float32)
    null = index_embedding(null_embedding(pipe), torch.zeros(PER_PROMPT, dtype=torch.long))
    emb, rests = phrase_embeddings(pipe, prompt, phrases, PER_PROMPT)
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    z, mi, maps = sample_with_mi(unet_eps_fn(pipe), z_T, emb, null, ddpm_scheduler(pipe), generator=generators(),
                                 return_map=True, **common)
    _, _, per_phrase = sample_with_phrase_mi(unet_eps_fn(pipe), z_T, emb, null, rests, ddpm_scheduler(pipe),
                                             generator=generators(), **common)
    return decode_latents(pipe, z), mi, maps, per_phrase, phrases


def figure(pipe) -> Figure:
    fig = Figure(figsize=(2.2 * 3 * PER_PROMPT, 2.6 * len(PROMPTS)), layout="constrained")
    for subfig, prompt in zip(fig.subfigures(len(PROMPTS), 1), PROMPTS):
        images, mi, maps, per_phrase, phrases = sample(pipe, prompt)
        subfig.suptitle(f'"{prompt}"', fontsize=11)
        axes = subfig.subplots(1, 3 * PER_PROMPT, width_ratios=[1, 1, 1.2] * PER_PROMPT)
        for c, image in enumerate(images):
            big = image.resize((128, 128), resample=0)
            axes[3 * c].imshow(np.asarray(big))
            axes[3 * c].set_title(f"candidate {c}: oracle {score_image(prompt, image):.2f}", fontsize=8)
            axes[3 * c + 1].imshow(np.asarray(overlay(big, maps[c])))
            axes[3 * c + 1].set_title(f"MI map (MI {mi[c]:.1f})", fontsize=8)
            for ax in axes[3 * c : 3 * c + 2]:
                ax.axis("off")
            bars = axes[3 * c + 2]
            bars.barh(range(len(phrases)), per_phrase[c].numpy(), color="tab:blue", height=0.5)
            bars.set_yticks(range(len(phrases)), [p.removeprefix("a ").replace(" ", "\n", 1) for p in phrases],
                            fontsize=7)
            bars.invert_yaxis()
            bars.set_title("phrase MI", fontsize=8)
            bars.tick_params(axis="x", labelsize=7)
            bars.set_box_aspect(1)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/mi/toy_maps.png"))
    args = parser.parse_args(argv)
    pipe = load_pipeline(str(MODEL_DIR))
    fig = figure(pipe)
    mio.save_figure(args.out, fig, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
