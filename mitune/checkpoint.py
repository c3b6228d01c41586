"""Lightning checkpoints as safetensors + JSON: nothing is ever unpickled on resume.

A checkpoint "file" is a directory holding ``tensors.safetensors`` (every tensor of the
checkpoint dict) and ``state.json`` (everything else, with tensors replaced by their key).
It is written into a temporary sibling and renamed, so a crash or a full disk while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors.torch import load_file, save_file

from mitune.io import atomic_dir

TENSORS, STATE = "tensors.safetensors", "state.json"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able copy of ``obj`` with tensors moved into ``tensors``; keeps int keys and tuples."""
    if isinstance(obj, torch.Tensor):
        key = f"{len(tensors)}:{path}"  # the count keeps keys unique even if paths collide
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[flatten(k, tensors, path), flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint value at {path or '/'} of type {type(obj).__name__} cannot be stored without pickle")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    return {k: unflatten(v, tensors) for k, v in obj.items()}


class SafetensorsCheckpointIO(CheckpointIO):
    """Drop-in for Lightning's TorchCheckpointIO without pickle."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        state = flatten(checkpoint, tensors)
        with atomic_dir(Path(path), STATE) as tmp:
            save_file(tensors, str(tmp / TENSORS))
            (tmp / STATE).write_text(json.dumps(state))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not (path / STATE).is_file():
            # A crash between the two renames of a save leaves the previous one aside.
            previous = sorted(path.parent.glob(f".{path.name}.old-*/{STATE}"))
            if not previous:
                raise FileNotFoundError(f"checkpoint {path} not found (expected {STATE} and {TENSORS} inside)")
            path = previous[-1].parent
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        return unflatten(json.loads((path / STATE).read_text()), load_file(str(path / TENSORS), device=device))

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (global step, W&B run id) without loading tensors."""
    return json.loads((Path(path) / STATE).read_text())


def progress_key(path: Path) -> tuple[int, int]:
    """(global step, epochs fully processed): a round-end checkpoint wins over a step one."""
    state = read_state(path)
    return state["global_step"], state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint in ``folder``, or None when there is none."""
    found = [p for p in Path(folder).glob("*.ckpt") if (p / STATE).is_file() and (p / TENSORS).is_file()]
    return max(found, key=progress_key, default=None)
