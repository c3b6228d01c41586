"""The toy world's "real" image-prompt pairs: the renderer's scenes of the training prompts, as an imagefolder.

The paper's "MI + Real" mixes real image-caption pairs (CC3M) into the fine-tuning set. In the toy world the real
image of a prompt is a scene the renderer draws for it (unnamed attributes and positions at random): what the toy
model was trained to imitate, and aligned by construction. Written as a Hugging Face ``imagefolder`` (``images/``,
``metadata.jsonl`` with ``file_name`` and ``prompt``), the layout ``train.real_images`` reads:

    python -m mitune.toy.real --out outputs/toy-real/seed0 --per-category 15 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mitune.runs.io import atomic_dir, write_jsonl, write_png
from mitune.runs.seeds import mix_seed
from mitune.toy.prompts import load_toy
from mitune.toy.world import parse, render

METADATA = "metadata.jsonl"


def write_real_pairs(out: str | Path, prompts: list[str], seed: int = 0, per_prompt: int = 1, size: int = 32) -> Path:
    """``per_prompt`` rendered scenes of each prompt, each drawn from its own generator (seed, prompt, index), written
    as one folder at once (a killed write leaves no half folder)."""
    out = Path(out).expanduser()
    with atomic_dir(out, METADATA) as tmp:
        rows = []
        for i, text in enumerate(prompts):
            for j in range(per_prompt):
                rng = np.random.default_rng(mix_seed(seed, text, j))
                name = f"images/{i:06d}_{j:03d}.png"
                write_png(tmp / name, Image.fromarray(render(parse(text), size=size, rng=rng)))
                rows.append({"file_name": name, "prompt": text})
        write_jsonl(tmp / METADATA, rows)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder to write (replaced if it holds an earlier one)")
    parser.add_argument("--split", default="train", help="toy prompt split (conf/data/toy.yaml)")
    parser.add_argument("--per-category", type=int, default=15, help="prompts per category (experiments/toy.yaml: 15)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="draws the scenes' unnamed attributes and positions")
    parser.add_argument("--per-prompt", type=int, default=1, help="scenes per prompt")
    args = parser.parse_args(argv)
    prompts = load_toy(args.split, args.per_category, args.split_seed).prompts
    out = write_real_pairs(args.out, prompts, args.seed, args.per_prompt)
    print(f"mitune.toy.real: {len(prompts) * args.per_prompt} rendered pairs of {len(prompts)} prompts in {out}")


if __name__ == "__main__":
    main()
