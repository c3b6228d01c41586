"""The on-disk contract between stages: every file name of a run dir and of an image folder.

Stages hand each other folders, not objects: ``generate`` writes an image folder (``RoundDir``:
a training round or an evaluation point), ``finetune`` writes a run's adapters (``RunDir``),
``evaluate`` writes results tables, ``summary`` reads them. This module is the one place that
spells those names, knows when a folder is complete and reads its rows, so the stages agree by
construction::

    <run dir>/                        RunDir
      run_config.yaml                 the resolved config the dir is tied to (mitune.runs.record)
      .mitune.lock                    one writer at a time (mitune.runs.record)
      checkpoints/                    Lightning checkpoints (mitune.runs.checkpoints)
      adapter/                        the newest round's adapter (diffusers' LoRA layout)
      rounds/progress.json            rounds trained and the global step at the last round's end
      rounds/round_<r>/               RoundDir of round r, with adapter/ (the model after round r)
      eval/round_<r>/<point>/         RoundDir of an evaluation point (mitune.evaluate)
      external/latents_00003.safetensors  the external image folder's latents, 64 images a file (train.real_images)

    <image folder>/                   RoundDir, a Hugging Face imagefolder
      round.json                      settings that decide the images (a resume must match them)
      images/000012_003.png           every candidate (prompt 12, candidate 3)
      latents/000012.safetensors      "latents" [M, C, h, w] and "mi" [M] of one prompt
      mi_maps/000012_003.png          the MI map over the image (generation.save_mi_maps)
      parts/000012.jsonl              one prompt's candidate rows; its presence marks the prompt as done
      metadata.jsonl                  all rows, merged from parts/ when the folder is finished (with score,
                                      rank and selected in a training round)
      summary.json                    MI statistics and the size of every file above ("files"), written last:
                                      the folder is complete, and a reuse checks it against the sizes
      mi_hist.png                     training rounds: the MI histogram

    <evaluation job dir>/results.csv  the tidy results table (RESULT_COLUMNS), scores.jsonl per image

    <cache dir>/weight_hashes.json    SHA-256 of model weight files by path, size and times (mitune.models.weights),
                                      so a model's gigabytes are read once, not at every start; beside it
                                      weight_hashes.json.lock, one writer at a time
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mitune.runs.io import read_jsonl, write_json, write_jsonl

METADATA = "metadata.jsonl"
FILES = "files"  # summary.json's record of every file's size
RESULTS = "results.csv"
SCORES = "scores.jsonl"
# The tidy table mitune.evaluate writes and mitune.summary reads: one row per (method, category,
# round, cfg, seed, metric). ``seed`` is the evaluation seed; ``train_seed`` the training run's; ``weights`` the
# digest of the base model's weight files (``mitune.models.weights.Weights.digest``; empty in tables made before it).
RESULT_COLUMNS = ["method", "category", "round", "cfg", "metric", "kind", "value", "std", "n", "num_prompts",
                  "images_per_prompt", "seed", "train_seed", "model", "weights", "run_dir", "image_dir"]


class OutsideRunDir(ValueError):
    """A path inside a run dir resolves (through a link) outside it."""


class DamagedFolder(FileNotFoundError, ValueError):
    """A finished image folder's file is missing or not as it was written (missing file and bad data alike)."""


def check_inside(root: Path, *paths: Path) -> None:
    """Refuse, before anything is written, a path under ``root`` that resolves outside it: a linked round,
    ``checkpoints/`` or ``adapter/`` would send a run's writes (and its deletions) into another folder."""
    inside = Path(root).expanduser().resolve()
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_relative_to(inside):
            raise OutsideRunDir(f"{path} resolves to {resolved}, outside the run dir {inside}; a run writes only inside "
                                "its own dir: replace the link with a plain folder, or start a new run dir")


def weight_hash_cache(cache_dir: Path) -> Path:
    """The weight files' SHA-256 cache in the shared cache dir (``paths.cache_dir``)."""
    return Path(cache_dir).expanduser() / "weight_hashes.json"


@dataclass(frozen=True)
class RoundDir:
    """An image folder written by ``mitune.rounds.generation.generate_round``: a training round (completed by
    ``mitune.rounds.selection.select_round``) or an evaluation point."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def settings_file(self) -> Path:
        return self.path / "round.json"

    @property
    def metadata(self) -> Path:
        return self.path / METADATA

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def histogram(self) -> Path:
        return self.path / "mi_hist.png"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def lock(self) -> Path:
        return self.path / ".writer.lock"

    def part(self, prompt_id: int) -> Path:
        return self.path / "parts" / f"{prompt_id:06d}.jsonl"

    def done_prompts(self) -> set[int]:
        return {int(p.stem) for p in (self.path / "parts").glob("*.jsonl")}

    @staticmethod
    def image_name(prompt_id: int, candidate: int) -> str:
        return f"images/{prompt_id:06d}_{candidate:03d}.png"

    @staticmethod
    def latents_name(prompt_id: int) -> str:
        return f"latents/{prompt_id:06d}.safetensors"

    @staticmethod
    def mi_map_name(prompt_id: int, candidate: int) -> str:
        return f"mi_maps/{prompt_id:06d}_{candidate:03d}.png"

    # What a finished folder holds: the sizes of these are recorded in summary.json (the adapter and the
    # histogram are written after it).
    CONTENT_DIRS = ("images", "latents", "mi_maps", "parts")

    def paths(self) -> tuple[Path, ...]:
        """Every path the folder's writers write to (checked to stay inside a run dir)."""
        return (self.path, self.settings_file, self.metadata, self.summary_file, self.histogram, self.adapter,
                self.lock, *(self.path / d for d in self.CONTENT_DIRS))

    def file_sizes(self) -> dict[str, int]:
        """Size in bytes of every content file (``CONTENT_DIRS``, round.json, metadata.jsonl) by relative path;
        links are not followed, temporaries (``.name.tmp``) left out."""
        sizes = {}
        for name in (self.settings_file.name, METADATA):
            if (self.path / name).is_file():
                sizes[name] = (self.path / name).stat().st_size
        for sub in self.CONTENT_DIRS:
            for folder, _, files in os.walk(self.path / sub):
                for name in files:
                    if not name.startswith("."):
                        path = Path(folder) / name
                        sizes[str(path.relative_to(self.path))] = path.stat().st_size
        return dict(sorted(sizes.items()))

    def complete(self, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Write every row, then the statistics with every file's size: the completion marker goes last."""
        write_jsonl(self.metadata, rows)
        write_json(self.summary_file, {**stats, FILES: self.file_sizes()})

    def is_complete(self) -> bool:
        """The one completion marker: ``summary.json`` is written after every other file of the folder."""
        return self.summary_file.is_file()

    def recorded_sizes(self) -> dict[str, int] | None:
        """The file sizes ``complete`` recorded; None for a folder finished before mitune recorded them.
        A damaged summary.json is a ValueError naming it."""
        try:
            summary = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.summary_file} is corrupt ({err})") from err
        if isinstance(summary, dict):
            return summary.get(FILES)
        raise ValueError(f"{self.summary_file} is corrupt (not a JSON object)")

    def damaged_files(self, sizes: dict[str, int]) -> list[str]:
        """``name: why`` for every recorded file that is missing or has another size now."""
        damaged = []
        for name, size in sizes.items():
            path = self.path / name
            if not path.is_file():
                damaged.append(f"{path} is missing")
            elif path.stat().st_size != size:
                damaged.append(f"{path} has {path.stat().st_size} bytes, {size} when the round completed")
        return damaged

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate's row, with clear errors for a missing or broken folder."""
        if not self.metadata.is_file():
            raise FileNotFoundError(f"{self.path} has no {METADATA}: its generation did not finish")
        try:
            return read_jsonl(self.metadata)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"metadata {self.metadata} is corrupt: {err}") from err

    def selected_rows(self) -> list[dict[str, Any]]:
        """Rows of the top-k candidates: the fine-tuning set."""
        chosen = [row for row in self.rows() if row.get("selected")]
        if not chosen:
            raise ValueError(f"fine-tuning set {self.path} has no selected candidates")
        return chosen

    def latents(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """The cached clean latents of ``rows`` (no VAE needed to train)."""
        files: dict[str, dict[int, torch.Tensor]] = {}
        latents = []
        for row in rows:
            name = row["latents"]
            if name not in files:
                try:
                    stored = load_file(str(self.path / name))
                    # A pruned prompt's file holds its finished candidates only, named by `candidates`.
                    index = stored["candidates"].tolist() if "candidates" in stored else range(len(stored["latents"]))
                    files[name] = dict(zip(index, stored["latents"]))
                except (FileNotFoundError, SafetensorError, KeyError) as err:
                    raise ValueError(f"latents {self.path / name} are missing or corrupt: {err}") from err
            if row["candidate"] not in files[name]:
                raise ValueError(f"latents {self.path / name} hold no candidate {row['candidate']}")
            latents.append(files[name][row["candidate"]])
        return torch.stack(latents)


def finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of candidates that finished sampling: those with an image (a round with ``generation.prune``
    also holds the stopped ones, ``pruned_at`` set, with their partial MI and no image)."""
    return [row for row in rows if row.get("pruned_at") is None]


def as_round_dir(folder: RoundDir | str | Path) -> RoundDir:
    """Stages accept an image folder as a ``RoundDir`` or as its path."""
    return folder if isinstance(folder, RoundDir) else RoundDir(Path(folder))


def external_part(cache: Path, chunk: int) -> Path:
    """One chunk of an external image folder's cached latents (``RunDir.external``)."""
    return cache / f"latents_{chunk:05d}.safetensors"


def eval_images(root: Path, r: int, cfg: float, num_images: int, seed: int, key: str) -> RoundDir:
    """The image folder of one evaluation point under ``root`` (a run's ``eval/`` by default); ``key``
    hashes everything else that decides the images, so a folder is only reused for the same images."""
    return RoundDir(root / f"round_{r}" / f"cfg{cfg:g}_n{num_images}_seed{seed}_{key}")


@dataclass(frozen=True)
class RunDir:
    """A training run's dir (``paths.output_dir`` of ``mitune.run``)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @property
    def config_record(self) -> Path:
        return self.path / "run_config.yaml"

    @property
    def lock(self) -> Path:
        return self.path / ".mitune.lock"

    @property
    def lock_owner(self) -> Path:
        return self.path / ".mitune.lock.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def rounds_dir(self) -> Path:
        return self.path / "rounds"

    @property
    def progress_file(self) -> Path:
        return self.rounds_dir / "progress.json"

    @property
    def eval_root(self) -> Path:
        return self.path / "eval"

    @property
    def external(self) -> Path:
        """The external image folder's cached latents (``mitune.rounds.external``)."""
        return self.path / "external"

    @property
    def csv_logs(self) -> Path:
        return self.path / "csv"

    @property
    def wandb_logs(self) -> Path:
        return self.path / "wandb"

    def check_inside(self, rounds: int) -> None:
        """Every path a run of ``rounds`` rounds writes must stay inside the dir (``check_inside``)."""
        check_inside(self.path, self.config_record, self.lock, self.lock_owner, self.checkpoints, self.adapter,
                     self.rounds_dir, self.progress_file, self.eval_root, self.external, self.csv_logs, self.wandb_logs,
                     self.path / ".hydra", *(p for r in range(1, rounds + 1) for p in self.round(r).paths()))

    def work(self) -> tuple[Path, ...]:
        """What ties the dir to its config once it exists: generated rounds, encoded external images, checkpoints,
        adapters."""
        return self.rounds_dir, self.external, self.checkpoints, self.adapter

    def round(self, r: int) -> RoundDir:
        return RoundDir(self.rounds_dir / f"round_{r}")

    def rounds_trained(self) -> int | None:
        """Rounds finished, from the progress file (None if the run has none)."""
        if not self.progress_file.is_file():
            return None
        try:
            return int(json.loads(self.progress_file.read_text(encoding="utf-8"))["rounds_trained"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.progress_file} is corrupt ({type(err).__name__}: {err}); restore it, or delete "
                             "it (each round's end rewrites it; without it a round's adapter is found by its files)") from err

    def write_progress(self, rounds_trained: int, global_step: int) -> None:
        write_json(self.progress_file, {"rounds_trained": rounds_trained, "global_step": global_step})
