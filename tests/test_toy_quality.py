"""The toy world's quality metric (toy_fd) and the trade-off it makes possible on the embedded default."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mitune import evaluate as ev
from mitune import summary
from mitune.metrics import build_quality_metric, quality_needs_reference
from mitune.toy.features import FEATURES_DIR, LABELS, load, scenes
from mitune.toy.world import to_tensor
from mitune.toy.world import balanced_prompts

PROMPTS = balanced_prompts("test", 4, seed=0)  # 4 per category, 20 in all


@pytest.fixture(scope="module")
def toy_fd():
    return build_quality_metric("toy_fd", progress=False)


def test_committed_feature_network_has_learned_the_world():
    """The committed weights (safetensors) recognise what fresh renderer scenes hold, far above chance."""
    assert (FEATURES_DIR / "model.safetensors").is_file() and (FEATURES_DIR / "README.md").is_file()
    images, labels = scenes(300, seed=123)
    predicted = (load()(to_tensor(images)) > 0).numpy()
    accuracy = (predicted == labels.astype(bool)).mean(0)
    colors = [i for i, name in enumerate(LABELS) if name.startswith("color=")]
    assert accuracy[colors].min() > 0.97 and accuracy.mean() > 0.9, dict(zip(LABELS, accuracy.round(3)))


def test_toy_fd_is_small_for_renderer_scenes_and_grows_with_damage(toy_fd):
    """Renderer scenes of the same prompts (other positions and free attributes) are close; blurred or
    recoloured ones are far, the more the worse: the distance measures the toy world's image quality."""
    prompts = [p for p in PROMPTS for _ in range(10)]
    same = toy_fd.reference_for(prompts, seed=1)
    reference = toy_fd.reference_for(prompts, seed=2)
    mild = [im.filter(ImageFilter.GaussianBlur(0.6)) for im in same]
    strong = [im.filter(ImageFilter.GaussianBlur(1.5)) for im in same]
    swapped = [Image.fromarray(np.asarray(im)[..., ::-1].copy()) for im in same]  # RGB -> BGR: other colors
    fd = {name: toy_fd.distance(images, reference)
          for name, images in [("same", same), ("mild", mild), ("strong", strong), ("swapped", swapped)]}
    assert fd["same"] < fd["mild"] < fd["strong"], fd
    assert fd["same"] * 5 < fd["swapped"], fd


def test_toy_fd_draws_its_own_reference_and_refuses_other_prompts(toy_fd):
    assert not quality_needs_reference("toy_fd") and quality_needs_reference("fid")
    drawn = toy_fd.reference_for(PROMPTS[:3], seed=0)
    assert [im.size for im in drawn] == [(32, 32)] * 3
    assert [np.asarray(a).tobytes() for a in drawn] == [np.asarray(b).tobytes() for b in toy_fd.reference_for(PROMPTS[:3], 0)]
    with pytest.raises(ev.MetricInputError, match="not a toy-world prompt"):
        toy_fd.reference_for(["a photo of a cat"], seed=0)


def test_quality_rows_meet_alignment_rows_per_category_and_pooled():
    """The labelling bug: alignment rows were per category and quality rows under the job's name ("toy"),
    so the summary found no point with both. Quality now comes per category plus ``all``."""
    categories = ["color"] * 4 + ["shape"] * 4
    groups = ev.quality_groups(categories)
    assert groups == {"color": [0, 1, 2, 3], "shape": [4, 5, 6, 7], "all": list(range(8))}
    assert ev.quality_groups(["color"] * 3) == {"color": [0, 1, 2]}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_toy_evaluation_gives_a_tradeoff_per_category_and_pooled(task_config, tmp_path):
    """On the embedded toy model: oracle alignment and toy_fd at two CFGs, through the one evaluation path;
    the summary draws the trade-off per category and over all of them."""
    sweep = tmp_path / "eval"
    for cfg in (2.0, 7.5):
        job = sweep / f"cfg_{cfg}"
        ev.evaluate(task_config("evaluate", ["logger=csv", "+experiment=demo_eval", "generation.num_inference_steps=8",
                                             f"generation.guidance_scale={cfg}", f"eval.image_root={tmp_path / 'images'}"], job))
        rows = read_csv(job / "results.csv")
        quality = {r["category"]: r for r in rows if r["metric"] == "toy_fd"}
        assert sorted(quality) == sorted(["color", "shape", "texture", "spatial", "complex", "all"])
        assert int(quality["all"]["n"]) == 15 * 6 and int(quality["color"]["n"]) == 3 * 6
        aligned = {r["category"] for r in rows if r["metric"] == "toy_oracle"}
        assert aligned == set(quality) - {"all"}
    written = summary.summarize([sweep], tmp_path / "summary", cfg=[2.0, 7.5], quality="toy_fd")
    points = read_csv(written["tradeoff_csv"])
    assert {p["category"] for p in points} == {"color", "shape", "texture", "spatial", "complex", "all"}
    assert {(p["category"], float(p["cfg"])) for p in points if p["category"] == "all"} == {("all", 2.0), ("all", 7.5)}
    assert all(p["quality_metric"] == "toy_fd" and p["alignment_metric"] == "toy_oracle" for p in points)
    assert written["tradeoff"].is_file() and written["table2_md"].is_file()
