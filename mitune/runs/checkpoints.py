"""Lightning checkpoints as safetensors + JSON: nothing is ever unpickled on resume.

A checkpoint "file" is a directory holding ``tensors.safetensors`` (every tensor of the
checkpoint dict) and ``state.json`` (everything else, with tensors replaced by their key, and
the SHA-256 of the tensors file, checked on load). It is written into a temporary sibling and
renamed, so a crash or a full disk while saving leaves the previous checkpoint intact. A
checkpoint with a non-finite tensor is never written, and one that holds such a tensor anyway (made
elsewhere, or damaged under a valid checksum) is refused on load, naming the newest finite one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mitune.runs.io import atomic_dir, sha256_file

TENSORS, STATE = "tensors.safetensors", "state.json"
CHECKSUM = "mitune_tensors_sha256"


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


WEIGHTS = ("/state_dict/", "/optimizer_states/")  # callbacks may hold inf legitimately (e.g. a best score)


def non_finite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Count of NaN/inf values per weight or optimizer-state tensor that has any."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items()
              if v.is_floating_point() and k.split(":", 1)[1].startswith(WEIGHTS)}
    return {k: n for k, n in counts.items() if n}


class SafetensorsCheckpointIO(CheckpointIO):
    """Drop-in for Lightning's TorchCheckpointIO without pickle.

    ``root`` confines deletions: Lightning removes superseded checkpoints by the path it restored
    from a checkpoint's own state, so a crafted or stale path must never reach ``rmtree`` unchecked.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        state = flatten(checkpoint, tensors)
        bad = non_finite(tensors)
        if bad:
            first = next(iter(bad))
            raise FloatingPointError(
                f"refusing to write checkpoint {path}: {sum(bad.values())} non-finite values in {len(bad)} tensor(s) "
                f"(first: {first.split(':', 1)[1]}); the earlier checkpoints are finite and kept. "
                "Lower train.lr or check the data"
            )
        with atomic_dir(Path(path), STATE) as tmp:
            save_file(tensors, str(tmp / TENSORS))
            state[CHECKSUM] = sha256_file(tmp / TENSORS)
            (tmp / STATE).write_text(json.dumps(state))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not (path / STATE).is_file():
            # A crash between the two renames of a save leaves the previous one aside.
            previous = sorted(path.parent.glob(f".{path.name}.old-*/{STATE}"))
            if not previous:
                raise FileNotFoundError(f"checkpoint {path} not found (expected {STATE} and {TENSORS} inside)")
            path = previous[-1].parent
        state = read_state(path)
        if sha256_file(path / TENSORS) != state.pop(CHECKSUM, None):
            raise ValueError(f"checkpoint {path / TENSORS} does not match the checksum in its {STATE} (damaged "
                             f"or truncated); delete {path} to resume from an earlier checkpoint")
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            tensors = load_file(str(path / TENSORS), device=device)
        except SafetensorError as err:
            raise ValueError(f"checkpoint tensors {path / TENSORS} cannot be read: {err}") from err
        bad = non_finite(tensors)
        if bad:
            good = newest_finite(path.parent, skip=path)
            raise FloatingPointError(
                f"checkpoint {path} holds {sum(bad.values())} non-finite values in {len(bad)} weight or optimizer "
                f"tensor(s) (first: {next(iter(bad)).split(':', 1)[1]}), so training cannot continue from it; "
                + (f"the newest finite checkpoint is {good}: resume=true after deleting {path}, or resume={good}"
                   if good else "no other checkpoint there is finite: start a new run dir"))
        return unflatten(state, tensors)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete a superseded checkpoint: only a checkpoint dir, and only inside ``root``."""
        target = Path(path)
        resolved = target.resolve()
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise ValueError(f"refusing to delete {target}: it resolves to {resolved}, outside the run dir {self.root}")
        if not target.exists():
            return
        if target.is_symlink() or not target.is_dir() or not {p.name for p in target.iterdir()} <= {TENSORS, STATE}:
            raise ValueError(f"refusing to delete {target}: it is not a checkpoint dir ({TENSORS} and {STATE} only)")
        shutil.rmtree(target)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (global step, W&B run id) without loading tensors."""
    file = Path(path) / STATE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint state {file} is corrupt ({err}); delete {Path(path)} to resume from an "
                         "earlier checkpoint") from err


def progress_key(path: Path) -> tuple[int, int]:
    """(global step, epochs fully processed): a round-end checkpoint wins over a step one."""
    state = read_state(path)
    return state["global_step"], state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``folder`` (a link that leads out of it is not followed), whatever their
    names (``round-001.ckpt``, and ``round-epoch=0.ckpt`` of older runs)."""
    inside = Path(folder).resolve()
    return [p for p in Path(folder).glob("*.ckpt")
            if p.resolve().is_relative_to(inside) and (p / STATE).is_file() and (p / TENSORS).is_file()]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint in ``folder``, or None when there is none."""
    return max(complete_checkpoints(folder), key=progress_key, default=None)


def newest_finite(folder: str | os.PathLike, skip: Path | None = None) -> Path | None:
    """The most advanced checkpoint in ``folder`` whose weights and optimizer state are all finite (other than
    ``skip``), or None; an unreadable one is passed over."""
    for path in sorted(complete_checkpoints(folder), key=progress_key, reverse=True):
        if skip is not None and path.resolve() == Path(skip).resolve():
            continue
        try:
            if not non_finite(load_file(str(path / TENSORS))):
                return path
        except (OSError, SafetensorError):
            continue
    return None
