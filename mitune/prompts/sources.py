"""Prompt files: loading, cleaning and the T2I-CompBench categories.

Prompt files are read once, before any model is loaded, so that a bad file fails in
seconds rather than after a GPU job has started.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
COMPBENCH_SPLITS = ("train", "val")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where prompt files are looked for, in order: $MITUNE_COMPBENCH_DIR, the shared data folder
# beside a checkout, then `make data`'s download folder.
COMPBENCH_DIRS = (REPO_ROOT.parent / "shared" / "data" / "t2i-compbench", REPO_ROOT / "data" / "t2i-compbench")
DOWNLOAD_HINT = "run `make data` to download the T2I-CompBench prompt files, or set MITUNE_COMPBENCH_DIR"


@dataclass(frozen=True)
class PromptSet:
    """Unique prompts in file order, plus what cleaning removed (reported, not hidden)."""

    prompts: list[str]
    source: str
    duplicates: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    categories: list[str] | None = None
    """Each prompt's category where the source mixes categories (the toy world); evaluation
    reports each category apart."""


def check_characters(lines: list[str], source: str) -> None:
    """A control character (NUL, escape codes: a binary file or a paste gone wrong) in a prompt would
    reach the tokenizer unseen, so it is refused with its line; tabs count as spaces."""
    for number, line in enumerate(lines, 1):
        bad = next((c for c in line if unicodedata.category(c) == "Cc" and c != "\t"), None)
        if bad is not None:
            raise ValueError(f"{source}, line {number}: control character U+{ord(bad):04X} in a prompt; "
                             "is it a text file? Remove the character and rerun")


def check_limit(limit: object) -> None:
    """``data.limit`` keeps the first N prompts: a whole number, or null for all."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"data.limit must be an integer >= 1 or null, got {limit!r}")


def clean_prompts(lines: list[str], source: str, limit: int | None = None) -> PromptSet:
    """Strip, drop blank lines and de-duplicate (first occurrence wins)."""
    check_limit(limit)
    check_characters(lines, source)
    stripped = [line.strip() for line in lines]
    blank = sum(1 for line in stripped if not line)
    kept = [line for line in stripped if line]
    if not kept:
        raise ValueError(f"prompt source {source} has no prompts (empty or only blank lines)")
    counts = Counter(kept)
    duplicates = {p: n for p, n in counts.items() if n > 1}
    if blank:
        log.warning("%s: skipped %d blank line(s)", source, blank)
    if duplicates:
        extra = sum(duplicates.values()) - len(duplicates)
        log.warning("%s: removed %d duplicate line%s; %d prompts kept (e.g. %r was repeated)", source, extra,
                    "s" * (extra != 1), len(counts), next(iter(duplicates)))
    return PromptSet(list(dict.fromkeys(kept))[:limit], source, duplicates, blank)


def read_prompt_file(path: str | os.PathLike, limit: int | None = None) -> PromptSet:
    """One prompt per line (UTF-8, LF or CRLF); ``limit`` keeps the first unique ones (smoke runs)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"prompt file {path} is a directory; give a text file with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    return clean_prompts(decode_lines(path), str(path), limit)


def decode_lines(path: Path) -> list[str]:
    """UTF-8 lines; a decoding error names the file and line, and a byte-order mark is dropped with a warning."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path}, line {line}: not UTF-8 ({err.reason} at byte {err.start}); "
                         "save it as UTF-8") from None
    if text.startswith("\ufeff"):
        log.warning("%s: dropped a UTF-8 byte-order mark", path)
        text = text[1:]
    return text.splitlines()


def compbench_file(category: str, split: str = "train", data_dir: str | None = None) -> Path:
    """Path of a T2I-CompBench prompt file, with a download hint when it is missing."""
    if category not in COMPBENCH_CATEGORIES:
        raise ValueError(f"unknown T2I-CompBench category {category!r}; expected one of {COMPBENCH_CATEGORIES}")
    if split not in COMPBENCH_SPLITS:
        raise ValueError(f"unknown T2I-CompBench split {split!r}; expected one of {COMPBENCH_SPLITS}")
    env_dir = data_dir or os.environ.get("MITUNE_COMPBENCH_DIR")
    candidates = [Path(env_dir)] if env_dir else list(COMPBENCH_DIRS)
    for folder in candidates:
        path = folder / f"{category}_{split}.txt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{category}_{split}.txt not found in {[str(c) for c in candidates]}; {DOWNLOAD_HINT}")


def load_compbench(
    category: str, split: str = "train", data_dir: str | None = None, limit: int | None = None
) -> PromptSet:
    return read_prompt_file(compbench_file(category, split, data_dir), limit)


def load_prompts(
    prompts: list[str] | None = None, prompt_file: str | None = None, limit: int | None = None
) -> PromptSet:
    """Prompts given inline (e.g. on the command line) or from a file; exactly one of the two."""
    if (prompts is None) == (prompt_file is None):
        raise ValueError("give exactly one of data.prompts or data.prompt_file")
    if prompt_file is not None:
        return read_prompt_file(prompt_file, limit)
    return clean_prompts(list(prompts), "data.prompts", limit)


def over_length(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts the text encoder will truncate; warned about, since their tail is silently lost."""
    limit = tokenizer.model_max_length
    ids = tokenizer(prompts, truncation=False).input_ids
    long = [p for p, seq in zip(prompts, ids) if len(seq) > limit]
    for p in long:
        log.warning("prompt longer than the tokenizer's %d tokens is truncated: %r", limit, p)
    return long


COMPBENCH_URL = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/main/examples/dataset/{name}"


def download_compbench(dest: str | os.PathLike = COMPBENCH_DIRS[-1]) -> Path:
    """Fetch the original prompt files (MIT licence) from the T2I-CompBench repository."""
    from urllib.request import urlopen

    from mitune.runs.io import write_text

    dest = Path(dest)
    for category in COMPBENCH_CATEGORIES:
        for split in COMPBENCH_SPLITS:
            name = f"{category}_{split}.txt"
            with urlopen(COMPBENCH_URL.format(name=name), timeout=60) as response:
                write_text(dest / name, response.read().decode("utf-8"))
            log.info("downloaded %s", dest / name)
    return dest
