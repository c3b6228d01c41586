"""Inputs both sides of the equivalence check share: prompts, images, a BERT-shaped vocabulary.

Imported by ``official_side.py`` (the official code's venv) and ``mitune_side.py`` (mitune's
venv), so it needs only numpy and PIL. Nothing here comes from the official code.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "t2i-compbench"
IMAGE_SIZE = 512  # SD-2-base's output size, what T2I-CompBench's scorers read
IMAGES_PER_PROMPT = 2

# bert-base-uncased's layout: the special tokens and the answer words at their real ids; BLIP adds
# [DEC] (30522) and [ENC] (30523) after the 30522 entries.
BERT_VOCAB_SIZE = 30522
SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
ANSWERS = {2053: "no", 2748: "yes"}
FIRST_WORD_ID = 1000


def prompts(root: Path = DATA) -> dict[str, list[str]]:
    """A few validation prompts per category, chosen to cover the question rules.

    Color/shape/texture: the first 4; complex: 4 with "the left"/"top"-style chunks, and
    punctuation that BLIP's ``pre_question`` strips.
    """
    out = {}
    for category in ("color", "shape", "texture", "non_spatial"):
        lines = [line.strip() for line in (root / f"{category}_val.txt").read_text().splitlines() if line.strip()]
        out[category] = lines[:4]
    complex_lines = [line.strip() for line in (root / "complex_val.txt").read_text().splitlines() if line.strip()]
    picked = [p for p in complex_lines if re.search(r"\b(left|right|top|side)\b", p)][:2]
    picked += [p for p in complex_lines if p not in picked][:2]
    out["complex"] = picked
    return out


def images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """Smooth random RGB images (low-frequency noise, bilinear-upsampled, then a little pixel noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.int16)
        big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(big))
    return out


def words(texts: list[str]) -> list[str]:
    """BERT's basic tokenization (lower case; punctuation split off) of ``texts``, deduplicated."""
    found = []
    for text in texts:
        for token in re.findall(r"\w+|[^\w\s]", text.lower()):
            if token not in found:
                found.append(token)
    return found


def vocab(texts: list[str]) -> list[str]:
    """A 30522-entry WordPiece vocabulary laid out like bert-base-uncased's.

    bert-base-uncased's own vocab.txt is on the Hugging Face hub, not reachable here, and no
    PyPI package found ships it: every word of ``texts`` gets an id from 1000 up (skipping the
    answer ids), so question ids are not bert-base-uncased's, but [CLS]/[SEP]/[PAD]/[UNK],
    yes/no, and [DEC]/[ENC] (added by BLIP) are.
    """
    table = [f"[unused{i}]" for i in range(BERT_VOCAB_SIZE)]
    for i, token in {**SPECIAL, **ANSWERS}.items():
        table[i] = token
    next_id = FIRST_WORD_ID
    for word in words(texts):
        if word in ANSWERS.values():
            continue
        while next_id in ANSWERS:
            next_id += 1
        table[next_id] = word
        next_id += 1
    return table
