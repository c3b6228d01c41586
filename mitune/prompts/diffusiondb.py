"""DiffusionDB prompt files for ``experiments/grid_diffusiondb.yaml`` (train and held-out test).

``python -m mitune.prompts.diffusiondb --out data/diffusiondb`` reads the prompt column of the
``poloclub/diffusiondb`` metadata table (2M images, one parquet file, no images downloaded)
with ``datasets``, drops prompts flagged NSFW, blank and duplicate ones, and writes two
disjoint random samples: ``train.txt`` (fine-tuning) and ``test.txt`` (evaluation).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from mitune.runs.io import write_text

METADATA_URL = "hf://datasets/poloclub/diffusiondb/metadata.parquet"


def sample_prompts(prompts: list[str], nsfw: list[float], num_train: int, num_test: int, *, seed: int = 0,
                   max_nsfw: float = 0.1) -> tuple[list[str], list[str]]:
    """Two disjoint seeded samples of the unique, non-blank prompts whose NSFW score is below ``max_nsfw``."""
    # Whitespace (newlines included) collapsed first, so every prompt is one line and duplicates match.
    flat = (" ".join((p or "").split()) for p, s in zip(prompts, nsfw) if s is not None and s < max_nsfw)
    kept = list(dict.fromkeys(p for p in flat if p))
    if len(kept) < num_train + num_test:
        raise ValueError(f"only {len(kept)} usable prompts for {num_train} train + {num_test} test")
    chosen = random.Random(seed).sample(kept, num_train + num_test)
    return chosen[:num_train], chosen[num_train:]


def export_prompts(out_dir: str | Path, num_train: int = 2000, num_test: int = 500, *, seed: int = 0,
                   max_nsfw: float = 0.1, source: str = METADATA_URL) -> Path:
    """Write ``train.txt`` and ``test.txt`` (one prompt per line) into ``out_dir``."""
    from datasets import load_dataset

    table = load_dataset("parquet", data_files=source, split="train", columns=["prompt", "prompt_nsfw"])
    train, test = sample_prompts(table["prompt"], table["prompt_nsfw"], num_train, num_test, seed=seed,
                                 max_nsfw=max_nsfw)
    out = Path(out_dir)
    for name, lines in (("train.txt", train), ("test.txt", test)):
        write_text(out / name, "".join(p + "\n" for p in lines))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mitune.prompts.diffusiondb", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/diffusiondb", help="output folder (default: data/diffusiondb)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-nsfw", type=float, default=0.1, help="drop prompts with prompt_nsfw >= this")
    parser.add_argument("--source", default=METADATA_URL, help="metadata parquet (hub URL or local file)")
    args = parser.parse_args(argv)
    print(export_prompts(args.out, args.num_train, args.num_test, seed=args.seed, max_nsfw=args.max_nsfw,
                         source=args.source))


if __name__ == "__main__":
    main()
