"""A run dir is one run: the config it was made with, one writer at a time, no stale temporaries.

A paper-scale round is a day of GPU time, so a resume or rerun must never mix two configurations
in one dir. The first start writes ``run_config.yaml`` (the resolved config, plus under ``weights``
the base model's weights: hub repo, commit and each weight file's SHA-256, and under ``prompts`` the
SHA-256 of the cleaned prompt list: a prompt file edited between rounds is another run); every later start
compares its own config with it, key by key, before any model is loaded, and refuses on a
difference. Only the keys in ``MUTABLE`` may change between starts: they decide where and how
the run executes or logs, not what it computes (``rounds`` may grow, to add rounds to a run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from mitune.runs.artifacts import RunDir
from mitune.runs.io import write_text

# Keys (and their sub-keys) that may differ on a resume: how many rounds, where and how it runs,
# what it logs and how often it checkpoints. Numerics on another device count or accelerator
# match to float rounding, not bit for bit (README, "Resume").
MUTABLE = (
    "rounds", "trainer.max_epochs", "resume", "logger", "callbacks", "paths.cache_dir", "model.device",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar",
    # The hub commit the weights came from: another commit with the same files (weights.files) is the same model.
    "weights.revision",
    # Micro-batches decide how the work is batched, not what it computes (equal up to float rounding, as on
    # another device count); lowering them is the way out of an out-of-memory error.
    "generation.micro_batch", "train.micro_batch",
    # Where the prompts were read from: the same prompts (prompts.sha256) from another copy are the same prompts.
    "prompts.source",
)

# The base model's weights in the record (``mitune.models.weights.Weights.record``). Records made before mitune
# recorded them have no such key: their weights are unknown, and such a run resumes without the check.
WEIGHTS = "weights"
# The prompts in the record (``prompt_record``); records made before mitune recorded them resume without the check.
PROMPTS = "prompts"
# The record's run dir: a moved or copied run dir is the same run, so paths inside it compare relative to it.
OUTPUT_DIR = ("paths", "output_dir")


# Where the ``_target_``s a record names went when mitune's modules moved into sub-packages (0.1 -> 0.2):
# a record made before reads as if made now, so those runs resume; the record file is left as written.
MOVED_TARGETS = {
    "mitune.generation.GenerationConfig": "mitune.rounds.settings.GenerationConfig",
    "mitune.mi.MIConfig": "mitune.mi.estimators.MIConfig",
    "mitune.config.TrainConfig": "mitune.rounds.settings.TrainConfig",
    "mitune.adapters.AdapterConfig": "mitune.models.adapters.AdapterConfig",
    "mitune.prompts.load_toy": "mitune.toy.prompts.load_toy",
    "mitune.loggers.ResumableCSVLogger": "mitune.runs.loggers.ResumableCSVLogger",
    **{f"mitune.callbacks.{name}": f"mitune.rounds.callbacks.{name}"
       for name in ("StepCheckpoint", "LearningRate", "samples_per_second", "DeviceStats", "RoundProgressBar")},
}


# Settings added since records were first written, with the value that computes what runs before them did:
# a record without the key reads as if it held that value.
ADDED_SETTINGS = {("train", "gradient_checkpointing"): False, ("generation", "prune"): [], ("train", "real_images"): None,
                  ("train", "real_fraction"): 0.0, ("train", "real_prompt_column"): "prompt", ("generator",): None,
                  ("rounds_from",): None, ("train", "restart"): False}


def renamed_targets(tree: Any) -> Any:
    """A recorded config with moved ``_target_``s renamed (``MOVED_TARGETS``)."""
    if isinstance(tree, dict):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" else renamed_targets(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [renamed_targets(v) for v in tree]
    return tree


def migrated(record: dict[str, Any]) -> dict[str, Any]:
    """A record read as if written now: moved ``_target_``s renamed, added settings at their earlier behaviour."""
    record = renamed_targets(record)
    for (*groups, key), value in ADDED_SETTINGS.items():
        parent = record
        for group in groups:
            parent = parent.get(group) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.setdefault(key, value)
    return record


class RunDirError(ValueError):
    """The run dir cannot be used with this config or by this process: bad input (a user error, one line on the
    console, ``mitune.runs.console.user_errors``), its message naming what differs or who holds the dir."""


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}``: nested mappings as dotted keys (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def is_mutable(key: str) -> bool:
    return any(key == m or key.startswith(f"{m}.") for m in MUTABLE)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every non-mutable key whose value differs (missing counts as <unset>)."""
    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if not is_mutable(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys]


def prompt_record(prompts: list[str], source: str) -> dict[str, Any]:
    """What the record holds of the prompts: their count and SHA-256 (of the cleaned list, in order), and the
    file (or config key) they came from."""
    return {"count": len(prompts), "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "source": source}


def relative_to_run(tree: Any, root: str | None) -> Any:
    """``tree`` with every string naming ``root`` or a path under it written as ``<run dir>/...``."""
    if not root:
        return tree
    if isinstance(tree, dict):
        return {k: relative_to_run(v, root) for k, v in tree.items()}
    if isinstance(tree, list):
        return [relative_to_run(v, root) for v in tree]
    if isinstance(tree, str) and (tree == root or tree.startswith(root.rstrip("/") + "/")):
        return "<run dir>" + tree[len(root.rstrip("/")):]
    return tree


def recorded_dir(record: dict[str, Any]) -> str | None:
    group, key = OUTPUT_DIR
    value = (record.get(group) or {}).get(key)
    return str(value) if value else None


def has_work(run_dir: Path) -> bool:
    return any(path.exists() and any(path.iterdir()) for path in RunDir(run_dir).work())


def check_config(run_dir: Path, config: dict[str, Any], resume: bool, weights: dict[str, Any],
                 prompts: dict[str, Any] | None = None) -> None:
    """Refuse a start whose config, base weights or prompts (``prompt_record``) differ from the run's record, or a
    fresh start over earlier work.

    The record is (re)written while the dir holds no work yet, so a start that failed before
    generating anything does not tie the dir to its config. Paths inside the run dir compare relative to
    it, so a moved or copied run dir resumes.
    """
    record = RunDir(run_dir).config_record
    config = {**config, WEIGHTS: weights, **({PROMPTS: prompts} if prompts is not None else {})}
    if not has_work(run_dir):
        write_text(record, yaml.safe_dump(config, sort_keys=True))
        return
    if not record.is_file():
        raise RunDirError(f"run dir {run_dir} holds run outputs but no {record.name}, so its config is unknown; "
                          "start a new run dir")
    try:
        old = yaml.safe_load(record.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RunDirError(f"{record} is corrupt ({err}); restore it or start a new run dir") from err
    old = migrated(old or {})
    for key in (WEIGHTS, PROMPTS):  # recorded before they were: unknown, not compared (the record is left as written)
        if key not in old:
            config.pop(key, None)
    new_dir = recorded_dir(config) or str(run_dir)
    # Both sides read as if written now, paths inside the run dir relative to it.
    diff = differences(relative_to_run(old, recorded_dir(old)), relative_to_run(migrated(config), new_dir))
    if diff:
        changed_prompts = [line for line in diff if line.startswith(f"{PROMPTS}.")]
        raise RunDirError(
            f"run dir {run_dir} was made with another config; one run dir holds one run, so it is not reused:\n  "
            + "\n  ".join(diff)
            + (f"\nThe prompts of {config[PROMPTS]['source']} are not those the run was made with (edited since?)."
               if changed_prompts else "")
            + f"\nStart a new run dir (another hydra.run.dir), or rerun with the recorded values ({record}). "
            f"Only these may change on a resume: {', '.join(MUTABLE)}."
        )
    if not resume:
        raise RunDirError(f"run dir {run_dir} already holds a run; add resume=true to continue it, "
                          "or choose a new hydra.run.dir to start another")


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's lock (filelock: released by the OS if the process dies); a second run
    on the same dir fails at once, naming the holder."""
    lock = FileLock(str(RunDir(run_dir).lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"run dir {run_dir} is in use by another mitune run ({holder(run_dir)}); "
                          "wait for it to end, or use another hydra.run.dir") from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(sys.argv)}
        write_text(RunDir(run_dir).lock_owner, json.dumps(owner))
        yield
    finally:
        RunDir(run_dir).lock_owner.unlink(missing_ok=True)
        lock.release()


def holder(run_dir: Path) -> str:
    try:
        owner = json.loads(RunDir(run_dir).lock_owner.read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted atomic write left behind (``mitune.runs.io``'s ``.name.tmp`` files and
    ``.name.tmp-*`` dirs), inside the run dir only and without following links."""
    removed = []
    for folder, dirs, files in os.walk(run_dir):
        here = Path(folder)
        for name in [d for d in dirs if d.startswith(".") and ".tmp-" in d]:
            shutil.rmtree(here / name)
            dirs.remove(name)
            removed.append(here / name)
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                (here / name).unlink()
                removed.append(here / name)
    return removed
