"""DiffusionDB prompt files for ``experiments/grid_diffusiondb.yaml`` (train and held-out test).

``python -m mitune.prompts.diffusiondb --out data/diffusiondb`` reads the prompt column of the
``poloclub/diffusiondb`` metadata table (2M images, one parquet file, no images downloaded)
with ``datasets``, drops prompts flagged NSFW, blank and duplicate ones, and writes two
disjoint random samples: ``train.txt`` (fine-tuning) and ``test.txt`` (evaluation).

With ``--images`` (the paper's Table 5 baseline, ``experiments/diffusiondb_images.yaml``) the train prompts are drawn
from the images of the first ``--image-parts`` zip parts only (1000 images each, so a few parts are downloaded, not
2M images), and ``images/`` holds the image DiffusionDB pairs with each, center-cropped and resized to ``--size``, as
an imagefolder (``images/metadata.jsonl``: file_name, prompt) for ``train.real_images``.
"""

from __future__ import annotations

import argparse
import io
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from mitune.runs.io import atomic_dir, write_jsonl, write_png, write_text

METADATA_URL = "hf://datasets/poloclub/diffusiondb/metadata.parquet"
REPO_ID = "poloclub/diffusiondb"


def hub_part(part_id: int) -> str:
    """A DiffusionDB image part (a zip of 1000 images) from the hub's cache, downloaded where it is not cached."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(REPO_ID, f"images/part-{part_id:06d}.zip", repo_type="dataset")


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


def export_pairs(out_dir: str | Path, num_train: int = 2000, num_test: int = 500, *, seed: int = 0,
                 max_nsfw: float = 0.1, source: str = METADATA_URL, parts: int = 10, size: int = 512,
                 fetch: Callable[[int], str | Path] = hub_part) -> Path:
    """``train.txt`` drawn from the prompts of the first ``parts`` image parts, each with its image (the first of the
    prompt's) in ``images/``; ``test.txt`` drawn from every other prompt, as ``export_prompts``."""
    from datasets import load_dataset

    table = load_dataset("parquet", data_files=source, split="train",
                         columns=["image_name", "prompt", "part_id", "prompt_nsfw"])
    image_of: dict[str, tuple[int, str]] = {}
    for name, prompt, part, nsfw in zip(table["image_name"], table["prompt"], table["part_id"], table["prompt_nsfw"]):
        flat = " ".join((prompt or "").split())
        if flat and part <= parts and nsfw is not None and nsfw < max_nsfw:
            image_of.setdefault(flat, (part, name))
    train, _ = sample_prompts(list(image_of), [0.0] * len(image_of), num_train, 0, seed=seed, max_nsfw=max_nsfw)
    chosen = set(train)
    rest = [(p, s) for p, s in zip(table["prompt"], table["prompt_nsfw"]) if " ".join((p or "").split()) not in chosen]
    _, test = sample_prompts([p for p, _ in rest], [s for _, s in rest], 0, num_test, seed=seed, max_nsfw=max_nsfw)
    out = Path(out_dir)
    with atomic_dir(out / "images", "metadata.jsonl") as tmp:
        rows = []
        for part in sorted({image_of[p][0] for p in train}):
            with zipfile.ZipFile(fetch(part)) as archive:
                for i, prompt in enumerate(train):
                    if image_of[prompt][0] != part:
                        continue
                    with Image.open(io.BytesIO(archive.read(image_of[prompt][1]))) as image:
                        square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
                    name = f"images/{i:06d}.png"
                    write_png(tmp / name, square)
                    rows.append({"file_name": name, "prompt": prompt})
        write_jsonl(tmp / "metadata.jsonl", sorted(rows, key=lambda row: row["file_name"]))
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
    parser.add_argument("--images", action="store_true", help="train prompts with their DiffusionDB images (images/)")
    parser.add_argument("--image-parts", type=int, default=10, help="draw the train prompts from parts 1..N")
    parser.add_argument("--size", type=int, default=512, help="image side after center crop and resize")
    args = parser.parse_args(argv)
    if args.images:
        print(export_pairs(args.out, args.num_train, args.num_test, seed=args.seed, max_nsfw=args.max_nsfw,
                           source=args.source, parts=args.image_parts, size=args.size))
        return
    print(export_prompts(args.out, args.num_train, args.num_test, seed=args.seed, max_nsfw=args.max_nsfw,
                         source=args.source))


if __name__ == "__main__":
    main()
