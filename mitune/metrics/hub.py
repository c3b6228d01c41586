"""Evaluation models by Hugging Face hub id or local folder, found before anything waits on the network.

Without a reachable hub, ``from_pretrained`` retries for a minute and then fails with a long
traceback; ``local_model`` answers at once, with one line saying what to download or set.
"""

from __future__ import annotations

from pathlib import Path

from mitune.metrics.base import MetricInputError


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
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):  # not cached, or not a hub id: ask the hub below
        pass
    try:
        model_info(name_or_path, timeout=10)
    except Exception as err:  # offline mode, no network, unknown repo: all end here
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MissingModelError(
            f"{metric} needs the model {name_or_path!r}: it is not a local folder, not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}), and the hub did not provide it ({reason}). Download it where "
            f"the hub is reachable (`hf download {name_or_path}`) and copy the cache here, or pass a local "
            f"folder as the metric's model_name_or_path"
        ) from None
    return name_or_path
