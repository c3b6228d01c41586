"""Atomic file writes: a crash or kill leaves either the old file or the new one, never half."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (weight files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def save_figure(path: Path, figure: Figure, dpi: int = 110) -> None:
    """A matplotlib ``Figure`` (no pyplot, so no global backend) as a PNG, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV under ``columns``: the one dialect of every table mitune writes."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_dir(out: Path, marker: str) -> Iterator[Path]:
    """Yield a temporary sibling dir to fill; once filled it is renamed to ``out``.

    A crash while filling leaves ``out`` as it was. An existing ``out`` is replaced only if it is
    empty or holds ``marker`` (an earlier result of the same kind), so a mistyped path never
    deletes unrelated files. Replacing is two renames: a crash between them leaves the old
    result under a hidden ``.<name>.old-*`` sibling rather than losing it.
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise FileExistsError(f"{out} exists and is not a dir with {marker}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail before any expensive work if results could not be saved."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):  # unique: ranks may probe at once
            pass
    except OSError as err:
        raise PermissionError(f"output dir {folder} is not writable: {err}") from err
    return folder
