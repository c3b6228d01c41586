"""Real image-prompt pairs in the fine-tuning set: the paper's "MI + Real" (Table 3) and its DiffusionDB-images
baseline (Table 5).

The pairs are a Hugging Face ``imagefolder`` (images and a ``metadata.jsonl`` with ``file_name`` and a prompt
column), the layout mitune's own rounds write. ``read_pairs`` checks every line and image before any model loads
(a bad one fails naming the file and line) and hashes them: the set's digest goes into the run's record, so a
resume with another set is refused. ``encode_pairs`` turns the images into latents with the trained model's VAE once,
in chunks written atomically under the run dir (``RunDir.external``): a killed encoding resumes with the next chunk.

``mix`` builds a round's fine-tuning set (``train.real_fraction`` f, ``RoundSet``): N = the round's selected set size
(prompts x top_k); round(f N) real pairs are drawn without replacement from the folder and N - round(f N) images
without replacement from the selected set, each draw seeded by (train.seed, round), so the total stays N and a seed
gives the same set on every run. f = 1 is real images alone: no round is generated and the set is the whole folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mitune.mi.pipeline import default_size, encode_images
from mitune.rounds.data import RoundSet
from mitune.runs.artifacts import METADATA, external_part
from mitune.runs.io import write_safetensors
from mitune.runs.seeds import mix_seed

ENCODE_CHUNK = 64
"""Images per cached latents file: the unit of resume for the encoding."""


class ExternalSetError(ValueError):
    """The external image folder cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Pairs:
    """The checked pairs of an external image folder: each image's path and prompt, the images' common
    (width, height) and a digest of the metadata and every image's bytes."""

    folder: Path
    files: list[Path]
    prompts: list[str]
    size: tuple[int, int]
    digest: str

    def record(self) -> dict[str, object]:
        """What the run's record holds of the set (the folder is this machine's path, so it is left out)."""
        return {"digest": self.digest, "pairs": len(self.files), "size": list(self.size)}


def read_pairs(folder: str | Path, column: str = "prompt") -> Pairs:
    """Every (image, prompt) of the folder's ``metadata.jsonl``, checked: a line that is not a JSON object, lacks
    ``file_name`` or ``column``, names a file outside the folder or an unreadable image, or has another image size
    than the first fails naming the file and line."""
    folder = Path(folder).expanduser()
    metadata = folder / METADATA
    if not metadata.is_file():
        raise ExternalSetError(f"external image folder {folder} has no {METADATA} (train.real_images)")
    root = folder.resolve()
    digest = hashlib.sha256()
    files: list[Path] = []
    prompts: list[str] = []
    size: tuple[int, int] | None = None
    raw = metadata.read_bytes()
    digest.update(raw)
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExternalSetError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise ExternalSetError(f"{where}: not a JSON object")
        for key in ("file_name", column):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ExternalSetError(f"{where}: no {key!r} (a non-empty string) in this row"
                                       + (" (train.real_prompt_column)" if key == column else ""))
        path = (folder / row["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise ExternalSetError(f"{where}: file_name {row['file_name']!r} is outside {folder}")
        try:
            data = path.read_bytes()
            with Image.open(path) as image:
                image.load()
                found = image.size
        except (OSError, UnidentifiedImageError) as err:
            raise ExternalSetError(f"{where}: image {row['file_name']!r} is missing or unreadable ({err})") from None
        if size is not None and found != size:
            raise ExternalSetError(f"{where}: image {row['file_name']!r} is {found[0]}x{found[1]}, the folder's first "
                                   f"is {size[0]}x{size[1]}; every image must have the model's size")
        size = found
        digest.update(row["file_name"].encode() + b"\0" + hashlib.sha256(data).digest())
        files.append(path)
        prompts.append(row[column])
    if size is None:
        raise ExternalSetError(f"{metadata} lists no images")
    return Pairs(folder, files, prompts, size, digest.hexdigest()[:16])


def check_size(pairs: Pairs, pipe: DiffusionPipeline) -> None:
    """The images must have the size the model generates: fine-tuning on another size changes the task."""
    height, width = default_size(pipe)
    if pairs.size != (width, height):
        raise ExternalSetError(f"{pairs.files[0]}: images are {pairs.size[0]}x{pairs.size[1]}, the "
                               f"model generates {width}x{height}; resize the folder's images to {width}x{height}")


def encode_pairs(pipe: DiffusionPipeline, pairs: Pairs, cache: Path, batch: int = 16, write: bool = True) -> torch.Tensor:
    """The pairs' latents, encoded once: chunk files under ``cache`` carry the set's digest, a chunk of another
    set or a damaged one is encoded again. ``write=False`` (the extra DDP ranks) encodes what is not cached without
    writing it: one writer per file."""
    chunks = []
    for start in range(0, len(pairs.files), ENCODE_CHUNK):
        path = external_part(cache, start // ENCODE_CHUNK)
        chunk = _cached(path, pairs.digest)
        if chunk is None:
            files = pairs.files[start : start + ENCODE_CHUNK]
            parts = []
            for i in range(0, len(files), batch):
                images = []
                for f in files[i : i + batch]:
                    with Image.open(f) as image:
                        images.append(image.convert("RGB"))
                parts.append(encode_images(pipe, images).cpu())
            chunk = torch.cat(parts)
            if write:
                write_safetensors(path, {"latents": chunk}, metadata={"digest": pairs.digest})
        chunks.append(chunk)
    return torch.cat(chunks)


def _cached(path: Path, digest: str) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != digest:
                return None
        return load_file(str(path))["latents"]
    except (FileNotFoundError, SafetensorError, KeyError, OSError):
        return None


@dataclass(frozen=True)
class RealSet:
    """The encoded pairs and the share of each round's set they make up (``train.real_fraction``)."""

    latents: torch.Tensor
    prompts: list[str]
    fraction: float
    seed: int

    def real_count(self, set_size: int) -> int:
        """round(f N) real pairs in a set of N (Python's round: halves to even)."""
        return round(self.fraction * set_size)

    def alone(self, round_index: int) -> RoundSet:
        """f = 1: the whole folder is the round's set."""
        return _round_set(round_index, self.latents, self.prompts)

    def mix(self, selected: RoundSet) -> RoundSet:
        """The round's set of N = len(selected) items: round(f N) pairs from the folder, the rest from the selected
        set, each drawn without replacement by a generator seeded by (seed, round)."""
        n = len(selected.latents)
        real = self.real_count(n)
        if real > len(self.latents):
            raise ExternalSetError(f"train.real_fraction={self.fraction} needs {real} real pairs per round, the folder "
                                   f"has {len(self.latents)}")
        g = torch.Generator().manual_seed(mix_seed(self.seed, selected.round_index, "real"))
        take_real = torch.randperm(len(self.latents), generator=g)[:real].sort().values
        take_mi = torch.randperm(n, generator=g)[: n - real].sort().values
        latents = torch.cat([selected.latents[take_mi], self.latents[take_real]])
        prompts = [selected.prompts[i] for i in selected.prompt_index[take_mi].tolist()]
        return _round_set(selected.round_index, latents, prompts + [self.prompts[i] for i in take_real.tolist()])


def _round_set(round_index: int, latents: torch.Tensor, rows: list[str]) -> RoundSet:
    prompts = list(dict.fromkeys(rows))
    position = {p: i for i, p in enumerate(prompts)}
    return RoundSet(round_index, latents, prompts, torch.tensor([position[p] for p in rows]))


def check_fraction(fraction: float, set_size: int, pairs: Pairs) -> None:
    """Before training: a mixed set must find its real pairs in the folder."""
    if 0 < fraction < 1 and round(fraction * set_size) > len(pairs.files):
        raise ExternalSetError(f"train.real_fraction={fraction} of a round's {set_size} selected images is "
                               f"{round(fraction * set_size)} real pairs; {pairs.folder} has {len(pairs.files)}")
