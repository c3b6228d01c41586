"""What every metric shares: the two metric interfaces, input checks and image-folder loading.

Alignment metrics score each (image, prompt) pair (higher is better); quality metrics compare
two image sets through a feature extractor (lower is better). Inputs are checked before any
model runs, so a bad folder or a length mismatch fails in seconds with a ``MetricInputError``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Union

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from mitune.runs.artifacts import METADATA, finished

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

FeatureExtractor = Callable[[Sequence[Image.Image]], torch.Tensor]
"""Images -> features [N, D]; quality metrics call it once per batch."""
ImageSource = Union[Sequence[Image.Image], str, os.PathLike]


class MetricInputError(ValueError):
    """The images, prompts or settings handed to a metric cannot be scored."""


# ----------------------------------------------------------------------------- images on disk


def open_rgb(path: Path) -> Image.Image:
    """Decode one image file fully as RGB, naming the file when it is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise MetricInputError(f"cannot read image {path}: {err}") from err


def check_readable(path: Path) -> None:
    """Cheap integrity check (header and chunk checksums) without decoding the pixels."""
    if not path.is_file():
        raise MetricInputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise MetricInputError(f"cannot read image {path}: {err}") from err


class ImageFiles(Sequence[Image.Image]):
    """Image files read on access, so thousands of images never sit in memory at once.

    Every file is verified when the sequence is made, so unreadable images fail before scoring.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        for path in tqdm(self.paths, desc="checking images", unit="img", disable=len(self.paths) < 500):
            check_readable(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [open_rgb(p) for p in self.paths[index]]
        return open_rgb(self.paths[index])

    def __iter__(self) -> Iterator[Image.Image]:
        return (open_rgb(p) for p in self.paths)


def _read_metadata(folder: Path) -> list[dict]:
    rows = []
    for number, line in enumerate((folder / METADATA).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MetricInputError(f"{folder / METADATA} line {number} is not JSON: {err}") from err
    return rows


def _image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _existing_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MetricInputError(f"image folder {path} does not exist or is not a directory")
    return path


def _metadata(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of ``metadata.jsonl`` that have an image (not a candidate pruned while sampling), each
    with a string in every one of ``columns``."""
    rows = finished(_read_metadata(path))
    if not rows:
        raise MetricInputError(f"{path / METADATA} has no rows")
    bad = [i for i, row in enumerate(rows) if not all(isinstance(row.get(c), str) for c in columns)]
    if bad:
        raise MetricInputError(
            f"{path / METADATA}: {len(bad)} row(s) lack a {' or '.join(map(repr, columns))} string "
            f"(first at row {bad[0] + 1})"
        )
    return rows


def _check_listed(listed: list[Path], folder: Path) -> None:
    """Every listed file exists, and no image beside them is missing from the metadata.

    Only the directories holding listed files are compared, so e.g. a round's ``mi_hist.png``
    next to ``metadata.jsonl`` does not count as an unlisted image.
    """
    missing = [p for p in listed if not p.is_file()]
    if missing:
        raise MetricInputError(
            f"{folder / METADATA} lists {len(missing)} image file(s) that do not exist, e.g. {missing[0]}"
        )
    dirs = {p.parent for p in listed}
    unlisted = sorted({p for d in dirs for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} - set(listed))
    if unlisted:
        raise MetricInputError(
            f"{len(unlisted)} image file(s) in {folder} are not in {METADATA}, e.g. {unlisted[0]}; "
            f"{METADATA} lists {len(listed)}"
        )


def _listed_images(path: Path, rows: list[dict]) -> ImageFiles:
    listed = [path / row["file_name"] for row in rows]
    _check_listed(listed, path)
    return ImageFiles(listed)


def load_image_folder(folder: str | os.PathLike) -> tuple[ImageFiles, list[str]]:
    """Images and their prompts from a Hugging Face ``imagefolder`` (a mitune round or eval dir).

    ``metadata.jsonl`` must give ``file_name`` (relative to the folder) and ``prompt`` for every
    row; images are returned in the metadata's order.
    """
    path = _existing_folder(folder)
    if not (path / METADATA).is_file():
        raise MetricInputError(
            f"{path} has {len(_image_paths(path))} image(s) but no {METADATA}; alignment metrics need a "
            "prompt per image (an imagefolder with 'file_name' and 'prompt' columns)"
        )
    rows = _metadata(path, ("file_name", "prompt"))
    return _listed_images(path, rows), [row["prompt"] for row in rows]


def load_images(source: ImageSource) -> Sequence[Image.Image]:
    """A folder's images (an imagefolder's metadata order, else every image file, sorted) or the sequence itself."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = _existing_folder(source)
    if (path / METADATA).is_file():
        return _listed_images(path, _metadata(path, ("file_name",)))
    return ImageFiles(_image_paths(path))


# ----------------------------------------------------------------------------- input checks


def check_images(images: Sequence[Image.Image], what: str = "images") -> None:
    if isinstance(images, (str, os.PathLike)):
        raise MetricInputError(f"{what} must be a sequence of PIL images; load a folder with load_image_folder")
    if len(images) == 0:
        raise MetricInputError(f"{what} is empty")
    if isinstance(images, ImageFiles):  # verified when it was made
        return
    bad = [i for i, image in enumerate(images) if not isinstance(image, Image.Image)]
    if bad:
        raise MetricInputError(
            f"{what} must be PIL images; item {bad[0]} is a {type(images[bad[0]]).__name__} ({len(bad)} bad item(s))"
        )


def check_pairs(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    """Same number of images and prompts, none empty, prompts are strings."""
    check_images(images)
    if isinstance(prompts, str):
        raise MetricInputError("prompts must be a sequence of strings, got a single string")
    if len(images) != len(prompts):
        raise MetricInputError(f"got {len(images)} image(s) but {len(prompts)} prompt(s); one prompt per image")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise MetricInputError(f"prompt {bad[0]} is a {type(prompts[bad[0]]).__name__}, not a string")


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MetricInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------- interfaces


class AlignmentMetric(ABC):
    """Scores how well each image shows its prompt; higher is better.

    Subclasses implement ``score_batch``; ``score`` checks the inputs once, then batches with a
    progress bar. Results are float64 on the CPU, one per image, and deterministic.
    """

    name: str = ""

    def __init__(self, batch_size: int = 16, progress: bool = True) -> None:
        self.batch_size = check_batch_size(batch_size)
        self.progress = progress

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per (image, prompt) pair."""
        check_pairs(images, prompts)
        self.check_prompts(prompts)
        parts = []
        bar = tqdm(total=len(prompts), desc=self.name, unit="img", disable=not self.progress, dynamic_ncols=True)
        for part in batches(len(prompts), self.batch_size):
            batch_images = [image.convert("RGB") for image in images[part]]
            scores = self.score_batch(batch_images, list(prompts[part]))
            parts.append(scores.detach().to("cpu", torch.float64).reshape(-1))
            bar.update(len(batch_images))
        bar.close()
        return torch.cat(parts)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Metric-specific prompt checks (e.g. a parsable spatial relation); run before any scoring."""

    @abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one batch of RGB images, shape [len(images)]."""


class QualityMetric(ABC):
    """Distance between two image sets' feature distributions (FID-like); lower is better.

    ``extractor`` maps a batch of images to features [N, D], so any backbone (or a tiny test
    stand-in) can be plugged in. ``min_samples`` is checked on both sets before features are made.
    """

    name: str = ""
    min_samples: int = 2
    needs_reference: bool = True
    """False where the metric draws its own reference for the evaluated prompts (``reference_for``): the toy
    world's renderer; then every category of a job is compared with its own prompts' references."""

    def __init__(self, extractor: FeatureExtractor, batch_size: int = 32, progress: bool = True) -> None:
        self.extractor = extractor
        self.batch_size = check_batch_size(batch_size)
        self.progress = progress

    def distance(self, images: ImageSource, reference: ImageSource) -> float:
        """Distance between ``images`` and ``reference`` (sequences of PIL images or folders)."""
        images, reference = load_images(images), load_images(reference)
        for what, sample in (("images", images), ("reference", reference)):
            check_images(sample, what)
            if len(sample) < self.min_samples:
                raise MetricInputError(
                    f"{self.name} needs at least {self.min_samples} {what}, got {len(sample)}"
                )
        return self.compare(self.features(images, "images"), self.features(reference, "reference"))

    def features(self, images: Sequence[Image.Image], what: str) -> torch.Tensor:
        """Extractor features of a whole set, float64 on the CPU."""
        parts = []
        bar = tqdm(total=len(images), desc=f"{self.name} {what}", unit="img", disable=not self.progress,
                   dynamic_ncols=True)
        for part in batches(len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[part]]
            parts.append(self.extractor(batch).detach().to("cpu", torch.float64).flatten(1))
            bar.update(len(batch))
        bar.close()
        return torch.cat(parts)

    def reference_for(self, prompts: Sequence[str], seed: int) -> list[Image.Image]:
        """One reference image per prompt (repeat a prompt for several), drawn from ``seed``."""
        raise MetricInputError(f"{self.name} draws no reference images of its own; give a folder of them")

    @abstractmethod
    def compare(self, features: torch.Tensor, reference: torch.Tensor) -> float:
        """The distance between two feature sets [N, D] and [M, D]."""
