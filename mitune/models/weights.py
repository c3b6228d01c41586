"""Which weights a model loads, known before it loads: the local folder (a hub id's cached snapshot, downloaded
first where the hub answers), the hub repo and commit it came from, and the SHA-256 of every weight file.

A run records them in its config record and an evaluation in each result row, so a resume on other weights is
refused and a table never pools results of different base weights unnoticed. Hashing needs the files, not the
model, so it runs before anything loads; each file is read once, then found in a small JSON cache by its
resolved path, size and times (``mitune.runs.artifacts.weight_hash_cache``). Only safetensors files are hashed
(diffusers' default format); a component stored as ``.bin`` alone is not covered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from mitune import ASSETS
from mitune.runs.artifacts import weight_hash_cache
from mitune.runs.io import sha256_file, write_json

# Components mitune never loads (``from_pretrained`` gets None for them): neither downloaded nor hashed.
SKIPPED = ("safety_checker",)
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


class ModelLoadError(FileNotFoundError):
    """A model's weights are not here: a missing or foreign folder, or a hub id neither cached nor downloadable."""


def is_local_path(value: str) -> bool:
    """'/x', './x', '~/x', existing paths and 'a/b/c' are paths; 'org/name' and 'name' are hub ids.

    Decided by form rather than existence, so a mistyped path fails as a missing path and never
    goes to the hub.
    """
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return True
    return os.sep in value and not _HUB_ID.fullmatch(value)


def cached_or_fetched(repo_id: str, fetch: Callable[..., str], unavailable: Callable[[str], Exception]) -> str:
    """``fetch(local_files_only=True)`` (the cached copy, no network call); else ``fetch()`` once the hub has
    answered for ``repo_id``; else ``unavailable(<the hub's reason>)`` is raised at once: without a reachable hub,
    ``from_pretrained`` retries for a minute and then fails with a long traceback."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return fetch(local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):  # not cached, or not a hub id: ask the hub below
        pass
    try:
        model_info(repo_id, timeout=10)
        return fetch()
    except Exception as err:  # offline mode, no network, unknown or gated repo, a failed download: all end here
        raise unavailable(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def _instead(setting: str | None) -> str:
    """How to name another source: the task's key where there is one (``model.path_or_id``)."""
    return f"set {setting}=<a local diffusers folder or another hub id>" if setting else \
        "pass a local diffusers folder or another hub id"


def hub_folder(repo_id: str, variant: str | None, setting: str | None = None) -> Path:
    """The cached snapshot of a hub pipeline with the files ``from_pretrained`` loads (the variant's, safetensors
    first, no skipped components), downloaded first where the hub answers."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    def fetch(local_files_only: bool = False) -> str:
        return DiffusionPipeline.download(repo_id, variant=variant, local_files_only=local_files_only,
                                          **dict.fromkeys(SKIPPED))

    def unavailable(reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"model {repo_id!r} is not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and the hub did not provide it ({reason}); download it where the hub is reachable "
            f"(`hf download {repo_id}`) and copy the cache here, or {_instead(setting)}")

    return Path(cached_or_fetched(repo_id, fetch, unavailable))


SHIPPED_MODELS = {"toy": ASSETS / "toy-model"}
"""Models mitune ships, by the name every entry point takes (``load_pipeline("toy")``, ``--model toy``)."""


def local_folder(path_or_id: str, variant: str | None = None, setting: str | None = None) -> Path:
    """The diffusers folder ``path_or_id`` names: a shipped model's name (``toy``), a local path, checked, or a hub
    id's snapshot (``hub_folder``). ``setting``: the config key that names the model, for the error messages."""
    if path_or_id in SHIPPED_MODELS:
        return SHIPPED_MODELS[path_or_id]
    if not is_local_path(path_or_id):
        return hub_folder(path_or_id, variant, setting)
    path = Path(path_or_id).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path_or_id!r} does not exist; {_instead(setting)}")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model path {path_or_id!r} has no model_index.json; expected a diffusers pipeline "
                             f"directory; {_instead(setting)}")
    return path


def weight_files(folder: Path, variant: str | None) -> list[str]:
    """The safetensors files a pipeline loads from ``folder``, relative to it: for each component it loads, the
    variant's files where the component has them, else its plain ones (diffusers' own rule)."""
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components = [name for name, spec in index.items()
                  if isinstance(spec, list) and spec and spec[0] is not None and name not in SKIPPED]
    names = [f"{name}/{path.name}" for name in components for path in (folder / name).glob("*.safetensors")]
    if not names:
        return []
    try:
        usable, _ = variant_compatible_siblings(names, variant=variant)
    except ValueError as err:  # a variant no component has
        raise ModelLoadError(f"model folder {folder}: {err} (model.variant={variant})") from None
    return sorted(usable)


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        found = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: the files are hashed again
        return {}
    return found if isinstance(found, dict) else {}


def file_hashes(folder: Path, names: list[str], cache: Path) -> dict[str, str]:
    """SHA-256 of each file, read only where the cache has no entry for its resolved path with the same size,
    mtime and ctime (ctime catches a file replaced with its old mtime restored)."""
    known, fresh, hashes = _read_cache(cache), {}, {}
    for name in names:
        path = os.path.realpath(folder / name)  # hub snapshots link to shared blobs: one entry per blob
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = known.get(path)
        if not isinstance(entry, dict) or entry.get("stat") != stamp:
            entry = fresh[path] = {"stat": stamp, "sha256": sha256_file(Path(path))}
        hashes[name] = entry["sha256"]
    if fresh:
        with FileLock(f"{cache}.lock"):  # parallel jobs: merge with what others wrote meanwhile
            merged = {**_read_cache(cache), **fresh}
            write_json(cache, {path: entry for path, entry in merged.items() if os.path.exists(path)})
    return hashes


def hub_snapshot(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of a snapshot folder of the Hugging Face cache (``models--<org>--<name>/snapshots/<commit>``,
    the hub's cache layout), else (None, None)."""
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    prefix = f"models{REPO_ID_SEPARATOR}"
    repo_dir = folder.parent.parent
    if folder.parent.name != "snapshots" or not repo_dir.name.startswith(prefix):
        return None, None
    return repo_dir.name.removeprefix(prefix).replace(REPO_ID_SEPARATOR, "/"), folder.name


@dataclass(frozen=True)
class Weights:
    """A pipeline's weights: the folder they load from, the hub repo and commit of that folder (None for a folder
    outside the Hugging Face cache), and the SHA-256 of each weight file by its path in the folder."""

    folder: Path
    repo: str | None
    revision: str | None
    files: dict[str, str]

    @property
    def digest(self) -> str:
        """12 hex digits over the files' names and hashes: the same weights give the same digest from any folder
        or mirror; "" where the folder has no safetensors weights (unknown)."""
        if not self.files:
            return ""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:12]

    def record(self) -> dict[str, Any]:
        """What a run's config record holds: the folder is this machine's, so it is left out."""
        return {"repo": self.repo, "revision": self.revision, "digest": self.digest,
                "files": dict(sorted(self.files.items()))}


def weights_of(folder: Path, variant: str | None, cache_dir: str | os.PathLike) -> Weights:
    """The weights a pipeline loads from ``folder``, hashed (once per file: ``file_hashes``)."""
    repo, revision = hub_snapshot(folder)
    files = file_hashes(folder, weight_files(folder, variant), weight_hash_cache(Path(cache_dir)))
    return Weights(folder, repo, revision, files)
