"""The toy world's grammar, renderer, oracle and split: the ground truth later training relies on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mitune.toy import oracle, world
from mitune.toy.oracle import detect, score
from mitune.toy.world import (
    CATEGORIES,
    COLORS,
    SHAPES,
    TEXTURES,
    Obj,
    Scene,
    category_of,
    parse,
    prompt,
    render,
    sample_scene,
    split_prompts,
)

N_SCENES = 200
FLIP = {
    "on the left of": "on the right of",
    "on the right of": "on the left of",
    "on top of": "below",
    "below": "on top of",
}


def _scenes(category: str, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(category, rng) for _ in range(N_SCENES)]


@pytest.mark.parametrize("category", CATEGORIES)
def test_prompt_parse_round_trip(category: str) -> None:
    for scene in _scenes(category):
        text = prompt(scene)
        assert parse(text) == scene
        assert prompt(parse(text)) == text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red",
        "a circle and",
        "a round circle",
        "a blue big circle",
        "a circle beside a square",
        "A red circle",
        "a red circle and a red square",
        "a circle and a square and a triangle",
    ],
)
def test_parse_rejects_non_grammar_prompts_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        parse(bad)


def test_render_is_deterministic_for_fixed_rng() -> None:
    scene = parse("a big striped red circle on the left of a small dotted blue triangle")
    first = render(scene, rng=np.random.default_rng(7))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render(scene, rng=np.random.default_rng(7)))
    assert not np.array_equal(first, render(scene, rng=np.random.default_rng(8)))


@pytest.mark.parametrize("category", CATEGORIES)
def test_oracle_scores_ground_truth_one(category: str) -> None:
    # Exact by construction: renders keep objects apart and satisfy the same centroid rule.
    rng = np.random.default_rng(1)
    for scene in _scenes(category):
        assert score(prompt(scene), render(scene, rng=rng)) == 1.0, prompt(scene)


def _objects_differ_beyond_color(scene: Scene) -> bool:
    a, b = scene.objects
    return replace(a, color=None) != replace(b, color=None)


def _corrupt_rates(corrupt, category: str, keep=lambda s: True) -> tuple[int, float]:
    """(#scenes, fraction with score < 1) of images rendered from corrupted scenes."""
    rng = np.random.default_rng(2)
    scenes = [s for s in _scenes(category, seed=3) if keep(s)]
    scores = [score(prompt(s), render(corrupt(s, rng), rng=rng)) for s in scenes]
    return len(scenes), float(np.mean(np.array(scores) < 1.0))


def _swap_colors(s: Scene, rng) -> Scene:
    a, b = s.objects
    return replace(s, objects=(replace(a, color=b.color), replace(b, color=a.color)))


def _wrong_shape(s: Scene, rng) -> Scene:
    a = s.objects[0]
    shape = str(rng.choice([x for x in SHAPES if x != a.shape]))
    return replace(s, objects=(replace(a, shape=shape), *s.objects[1:]))


def _wrong_texture(s: Scene, rng) -> Scene:
    a = s.objects[0]
    texture = str(rng.choice([t for t in TEXTURES if t != a.texture]))
    return replace(s, objects=(replace(a, texture=texture), *s.objects[1:]))


def _wrong_size(s: Scene, rng) -> Scene:
    a = s.objects[0]
    return replace(s, objects=(replace(a, size="small" if a.size == "big" else "big"), *s.objects[1:]))


@pytest.mark.parametrize(
    ("name", "corrupt", "category", "keep"),
    [
        ("swapped colors", _swap_colors, "color", _objects_differ_beyond_color),
        ("wrong shape", _wrong_shape, "color", lambda s: True),
        ("wrong shape", _wrong_shape, "shape", lambda s: True),
        ("wrong size", _wrong_size, "shape", lambda s: True),
        ("wrong texture", _wrong_texture, "texture", lambda s: True),
        ("swapped spatial", lambda s, rng: replace(s, relation=FLIP[s.relation]), "spatial", lambda s: True),
        ("missing object", lambda s, rng: Scene(s.objects[:1]), "spatial", lambda s: True),
        ("wrong texture", _wrong_texture, "complex", lambda s: True),
    ],
)
def test_oracle_rejects_corrupted_images(name: str, corrupt, category: str, keep) -> None:
    n, rejected = _corrupt_rates(corrupt, category, keep)
    assert n >= 50, name
    assert rejected == 1.0, f"{name} on {category}: only {rejected:.1%} scored < 1"


def test_oracle_gives_partial_credit_for_a_wrong_binding() -> None:
    image = render(parse("a blue circle and a red square"), rng=np.random.default_rng(0))
    assert score("a red circle and a blue square", image) == pytest.approx(0.25)
    assert score("a blue circle and a red square", image) == 1.0
    assert score("a red square", image) == 1.0  # extra objects are not penalised
    assert score("a green square", image) == pytest.approx(0.5)


def test_detect_reads_every_attribute() -> None:
    image = render(parse("a big striped yellow triangle"), rng=np.random.default_rng(0))
    (found,) = detect(image)
    assert (found.color, found.shape, found.size, found.texture) == ("yellow", "triangle", "big", "striped")


def test_blank_image_scores_zero() -> None:
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert score("a red circle", blank) == 0.0


def test_split_holds_out_pairings_and_shares_no_prompt() -> None:
    split = split_prompts(seed=0, n_train=400, n_test=150)
    assert len(split.train) == 400 and len(split.test) == 150
    assert len(set(split.train)) == 400 and len(set(split.test)) == 150
    assert not set(split.train) & set(split.test)
    # every color and shape is still seen in training; only the held-out bindings are new
    assert {c for c, _ in split.held_out_color_shape} <= set(COLORS)
    train_objs = [o for p in split.train for o in parse(p).objects]
    test_scenes = [parse(p) for p in split.test]
    assert not any(split.is_held_out(o) for o in train_objs)
    assert all(any(split.is_held_out(o) for o in s.objects) for s in test_scenes)
    assert {o.color for o in train_objs if o.color} == set(COLORS)
    assert {o.shape for o in train_objs} == set(SHAPES)
    assert {(o.color, o.shape) for s in test_scenes for o in s.objects} & split.held_out_color_shape == (
        split.held_out_color_shape
    )
    assert {len({c for c, _ in split.held_out_color_shape})} == {len(SHAPES)}
    assert split_prompts(seed=0, n_train=400, n_test=150) == split
    assert split_prompts(seed=1, n_train=400, n_test=150) != split


def test_split_fails_loudly_when_too_many_prompts_are_asked() -> None:
    with pytest.raises(ValueError, match="could not draw"):
        split_prompts(seed=0, n_train=10, n_test=10, max_tries=5)


def test_obj_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError):
        Obj(shape="hexagon")


@pytest.mark.parametrize("category", CATEGORIES)
def test_category_is_read_back_from_any_sampled_prompt(category):
    rng = np.random.default_rng(7)
    assert {category_of(prompt(sample_scene(category, rng))) for _ in range(100)} == {category}


def _flood_fill_components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """Reference for ``oracle._components``: the 8-neighbour flood fill the oracle used before scipy."""
    seen, (h, w), out = np.zeros_like(mask), mask.shape, []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = [start], set()
        while queue:
            y, x = queue.pop()
            pixels.add((int(y), int(x)))
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(pixels)
    return out


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7])
def test_components_equal_an_eight_neighbour_flood_fill(density: float) -> None:
    # Random masks touch diagonally everywhere, so 4-connectivity or another component order fails here.
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((32, 32)) < density
        got = [{(int(y), int(x)) for y, x in c} for c in oracle._components(mask)]
        assert got == _flood_fill_components(mask)


@pytest.mark.parametrize("category", CATEGORIES)
def test_detect_is_unchanged_by_the_scipy_labelling(category: str, monkeypatch) -> None:
    """Clean renders and renders with palette-colored speckle (specks, touching blobs) read the same."""
    rng = np.random.default_rng(5)
    colors = np.array([world.INK, *world.PALETTE.values()], dtype=np.uint8)
    images = []
    for scene in _scenes(category)[:50]:
        image = render(scene, rng=rng)
        noisy = image.copy()
        speckle = rng.random(image.shape[:2]) < 0.05
        noisy[speckle] = colors[rng.integers(len(colors), size=int(speckle.sum()))]
        images += [image, noisy]
    found = [detect(im) for im in images]
    monkeypatch.setattr(oracle, "_components", lambda mask: [np.array(sorted(c)) for c in _flood_fill_components(mask)])
    assert found == [detect(im) for im in images]
    assert sum(len(f) for f in found) > len(images)  # speckle adds components; not vacuous
