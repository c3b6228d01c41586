"""Evaluation models by Hugging Face hub id or local folder, found before anything waits on the network.

Without a reachable hub, ``from_pretrained`` retries for a minute and then fails with a long
traceback; ``local_model`` answers at once, with one line saying what to download or set.
"""

from __future__ import annotations

from pathlib import Path

from mitune.metrics.base import MetricInputError
from mitune.models.weights import cached_or_fetched


class MissingModelError(MetricInputError):
    """An evaluation model is neither on this machine nor downloadable from here."""


def local_model(name_or_path: str, metric: str) -> str:
    """A local folder as it is; a hub id as its cached snapshot, or as itself when the hub answers
    (``from_pretrained`` then downloads it); otherwise a ``MissingModelError``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")):
        raise MissingModelError(f"{metric}: model folder {path} does not exist")
    from huggingface_hub import constants, snapshot_download

    def fetch(local_files_only: bool = False) -> str:
        # Cached: the snapshot's folder. Not cached but on the hub: the id, which from_pretrained downloads.
        return snapshot_download(name_or_path, local_files_only=True) if local_files_only else name_or_path

    def unavailable(reason: str) -> MissingModelError:
        return MissingModelError(
            f"{metric} needs the model {name_or_path!r}: it is not a local folder, not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}), and the hub did not provide it ({reason}). Download it where "
            f"the hub is reachable (`hf download {name_or_path}`) and copy the cache here, or pass a local "
            f"folder as the metric's model_name_or_path")

    return cached_or_fetched(name_or_path, fetch, unavailable)
