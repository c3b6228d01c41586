"""Exact, rule-based alignment judge for ``mitune.toy.world`` images (a stand-in for BLIP-VQA/UniDet).

``score(prompt, image)`` follows T2I-CompBench's recipe: a score per noun phrase, multiplied
over phrases, times a centroid rule for spatial prompts. Each check is plain geometry:

* **segmentation** - each pixel takes the nearest of background, ink and the palette colors;
  non-background pixels form 8-connected components (specks under ``MIN_AREA`` px dropped);
  a component is one object, and its ink pixels (texture marks) belong to it.
* **color** - the most frequent palette color among the component's non-ink pixels.
* **shape** - fill ratio of the bounding box: square ~1, circle ~0.76-0.81, triangle ~0.5.
* **size** - bounding-box extent: ``big`` from ``world.BIG_MIN_EXTENT`` px (drawn: 7 vs 13).
* **texture** - ink fraction of the component: below ``SOLID_MAX_INK`` is solid; otherwise
  striped if most ink pixels have an ink left/right neighbour (ink rows), else dotted.
* **phrase** - matched / mentioned attributes (shape always mentioned), so a wrong binding
  earns partial credit; a phrase with no object left to claim scores 0.
* **spatial** - ``world.relation_holds`` on the two objects' centroids (1 or 0).

Phrases are matched to distinct objects by the best one-to-one assignment; extra objects in
the image are not penalised (a VQA model asked about the mentioned objects would not see them).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image
from scipy import ndimage

from mitune.toy.world import BACKGROUND, BIG_MIN_EXTENT, COLORS, INK, PALETTE, Obj, parse, relation_holds

MIN_AREA = 6
"""Components smaller than this (px) are noise; the smallest drawn object has 25 px."""
SOLID_MAX_INK = 0.03
"""Ink fraction up to which an object counts as solid (drawn: 0 solid, >= ~0.08 otherwise)."""

_REFERENCE = np.array([BACKGROUND, INK, *PALETTE.values()], dtype=np.float32)
_BG, _INK = 0, 1  # label ids; palette color k has label k + 2
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detected:
    """Attributes the rules read off one connected component."""

    color: str | None
    shape: str
    size: str
    texture: str
    centroid: tuple[float, float]  # (row, col)


def _labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel index of the nearest reference color (background, ink, palette...)."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    dist = ((pixels - _REFERENCE[None]) ** 2).sum(-1)
    return dist.argmin(-1).reshape(image.shape[:2])


def _components(foreground: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as (N, 2) arrays of (row, col), in raster order."""
    components, n = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    return [np.argwhere(components == k) for k in range(1, n + 1)]


def _classify_shape(fill: float) -> str:
    if fill >= 0.9:
        return "square"
    return "circle" if fill >= 0.65 else "triangle"


def _describe(labels: np.ndarray, pixels: np.ndarray) -> Detected:
    ys, xs = pixels[:, 0], pixels[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    lab = labels[ys, xs]
    is_ink = lab == _INK
    paint = lab[~is_ink]
    color = COLORS[np.bincount(paint - 2).argmax()] if paint.size else None
    ink_frac = float(is_ink.mean())
    if ink_frac <= SOLID_MAX_INK:
        texture = "solid"
    else:
        ink_y, ink_x = ys[is_ink], xs[is_ink]
        right = labels[ink_y, np.minimum(ink_x + 1, labels.shape[1] - 1)] == _INK
        left = labels[ink_y, np.maximum(ink_x - 1, 0)] == _INK
        texture = "striped" if (right | left).mean() > 0.5 else "dotted"
    return Detected(
        color=color,
        shape=_classify_shape(len(pixels) / (h * w)),
        size="big" if max(h, w) >= BIG_MIN_EXTENT else "small",
        texture=texture,
        centroid=(float(ys.mean()), float(xs.mean())),
    )


def detect(image: np.ndarray) -> list[Detected]:
    """All objects in an (H, W, 3) uint8 image, largest first."""
    labels = _labels(image)
    comps = [c for c in _components(labels != _BG) if len(c) >= MIN_AREA]
    comps.sort(key=len, reverse=True)
    return [_describe(labels, c) for c in comps]


def phrase_score(obj: Obj, found: Detected) -> float:
    """Fraction of the phrase's mentioned attributes (shape always) that ``found`` has."""
    wanted = [(a, getattr(obj, a)) for a in ("shape", "color", "size", "texture")]
    wanted = [(a, v) for a, v in wanted if v is not None]
    return sum(getattr(found, a) == v for a, v in wanted) / len(wanted)


def score(prompt: str, image: np.ndarray) -> float:
    """Alignment of ``image`` with a grammar ``prompt`` in [0, 1]; 1 means every check passes."""
    scene = parse(prompt)
    found = detect(image)
    n = len(scene.objects)
    if len(found) < n:  # a missing object scores 0 in the product
        return 0.0
    best = 0.0
    for chosen in permutations(found, n):
        total = float(np.prod([phrase_score(o, d) for o, d in zip(scene.objects, chosen)]))
        if scene.relation is not None:
            total *= relation_holds(chosen[0].centroid, chosen[1].centroid, scene.relation)
        best = max(best, total)
    return best


def pixels(image: Image.Image) -> np.ndarray:
    """A decoded or saved image of any mode as the (H, W, 3) uint8 array ``score`` and ``detect`` read;
    every caller converts through here, so they cannot disagree on how an image becomes pixels."""
    return np.asarray(image.convert("RGB"))


def score_image(prompt: str, image: Image.Image) -> float:
    """``score`` of a decoded or saved image of any mode (the ``toy_oracle`` metric scores through here)."""
    return score(prompt, pixels(image))
