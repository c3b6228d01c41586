"""Metric interfaces, input checks, image folders, registries, the toy oracle and quality math."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mitune.metrics import (
    ALIGNMENT_METRICS,
    CATEGORY_METRICS,
    QUALITY_METRICS,
    AlignmentMetric,
    MetricInputError,
    MissingModelError,
    build_alignment_metric,
    build_quality_metric,
    load_image_folder,
    load_images,
    metric_for_category,
)
from mitune.metrics.quality import CMMD, FID, FrechetDistance, frechet_distance, rbf_mmd
from mitune.prompts.sources import COMPBENCH_CATEGORIES
from mitune.toy import world


def solid(color, size=8):
    return Image.new("RGB", (size, size), tuple(int(c) for c in color))


class RecordingMetric(AlignmentMetric):
    """Scores an image by its mean red value plus the prompt's length; records each batch."""

    name = "recording"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches = []

    def score_batch(self, images, prompts):
        self.batches.append(len(images))
        return torch.tensor([np.asarray(im)[..., 0].mean() + len(p) for im, p in zip(images, prompts)])


def write_folder(folder, colors, prompts, metadata=True):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (color, prompt) in enumerate(zip(colors, prompts)):
        name = f"images/{i:03d}.png"
        (folder / "images").mkdir(exist_ok=True)
        solid(color).save(folder / name)
        rows.append({"file_name": name, "prompt": prompt, "mi": float(i)})
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ----------------------------------------------------------------------------- folders


def test_load_image_folder_reads_a_round_dir_in_metadata_order(tmp_path):
    colors = [(10, 0, 0), (20, 0, 0), (30, 0, 0)]
    folder = write_folder(tmp_path / "round_1", colors, ["a red cube", "a blue cube", "a cat"])
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    images, prompts = load_image_folder(folder)
    assert prompts == ["a cat", "a blue cube", "a red cube"]
    assert [im.getpixel((0, 0)) for im in images] == [(30, 0, 0), (20, 0, 0), (10, 0, 0)]
    assert all(im.mode == "RGB" for im in images)


def test_folder_with_images_but_no_metadata_is_rejected_for_alignment(tmp_path):
    folder = write_folder(tmp_path / "f", [(0, 0, 0)] * 2, ["x", "y"], metadata=False)
    with pytest.raises(MetricInputError, match="2 image.*no metadata.jsonl"):
        load_image_folder(folder)
    assert len(load_images(folder)) == 2  # quality metrics need no prompts


def test_metadata_and_images_on_disk_must_agree(tmp_path):
    folder = write_folder(tmp_path / "f", [(0, 0, 0)] * 3, ["x", "y", "z"])
    solid((0, 0, 0)).save(folder / "mi_hist.png")  # a round's plot beside the metadata is fine
    assert len(load_image_folder(folder)[0]) == 3
    solid((0, 0, 0)).save(folder / "images" / "extra.png")
    with pytest.raises(MetricInputError, match="1 image file.* not in metadata.jsonl, e.g. .*extra.png; metadata.jsonl lists 3"):
        load_image_folder(folder)
    (folder / "images" / "extra.png").unlink()
    (folder / "images" / "002.png").unlink()
    with pytest.raises(MetricInputError, match="lists 1 image file.* do not exist, e.g. .*002.png"):
        load_image_folder(folder)


def test_rows_without_prompt_and_unreadable_images_are_named(tmp_path):
    folder = write_folder(tmp_path / "a", [(0, 0, 0)] * 2, ["x", "y"])
    (folder / "metadata.jsonl").write_text('{"file_name": "images/000.png"}\n{"file_name": "images/001.png", "prompt": "y"}\n')
    with pytest.raises(MetricInputError, match="lack a 'file_name' or 'prompt' string.*row 1"):
        load_image_folder(folder)
    assert len(load_images(folder)) == 2  # a reference set needs no prompts
    folder = write_folder(tmp_path / "b", [(0, 0, 0)] * 2, ["x", "y"])
    (folder / "images" / "001.png").write_bytes(b"not a png at all")
    with pytest.raises(MetricInputError, match="cannot read image .*001.png"):
        load_image_folder(folder)
    with pytest.raises(MetricInputError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------- alignment interface


def test_score_is_one_float64_per_image_and_independent_of_batch_size():
    images = [solid((r, 0, 0)) for r in (0, 50, 100, 150, 200)]
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    expected = torch.tensor([0 + 1, 50 + 2, 100 + 3, 150 + 4, 200 + 5], dtype=torch.float64)
    for batch_size in (1, 2, 5, 8):
        metric = RecordingMetric(batch_size=batch_size, progress=False)
        scores = metric.score(images, prompts)
        assert scores.dtype == torch.float64 and scores.device.type == "cpu"
        torch.testing.assert_close(scores, expected)
        assert sum(metric.batches) == 5 and max(metric.batches) == min(batch_size, 5)


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        ([], [], "images is empty"),
        ([solid((0, 0, 0))] * 2, ["x"], "2 image.*1 prompt"),
        ([solid((0, 0, 0))], "x", "single string"),
        ([np.zeros((4, 4, 3))], ["x"], "item 0 is a ndarray"),
        ([solid((0, 0, 0))], [3], "prompt 0 is a int"),
        ("some/folder", ["x"], "load_image_folder"),
    ],
)
def test_bad_alignment_input_fails_before_any_scoring(images, prompts, message):
    metric = RecordingMetric(progress=False)
    with pytest.raises(MetricInputError, match=message):
        metric.score(images, prompts)
    assert metric.batches == []


def test_bad_batch_size_is_rejected():
    with pytest.raises(MetricInputError, match="batch_size"):
        RecordingMetric(batch_size=0)


def test_registries_build_by_name_and_list_known_names_on_typos():
    assert {"mi", "clip_score", "blip_vqa", "hps", "spatial", "toy_oracle"} <= set(ALIGNMENT_METRICS)
    assert {"fid", "fd_dino", "cmmd"} <= set(QUALITY_METRICS)
    assert build_alignment_metric("toy_oracle", progress=False).name == "toy_oracle"
    with pytest.raises(ValueError, match="unknown alignment metric 'clipscore'; known: mi, clip_score"):
        build_alignment_metric("clipscore")
    with pytest.raises(ValueError, match="unknown quality metric 'kid'; known: fid, fd_dino, cmmd"):
        build_quality_metric("kid")


def test_every_compbench_category_has_a_registered_metric():
    for category in COMPBENCH_CATEGORIES:
        assert metric_for_category(category) in ALIGNMENT_METRICS
    assert CATEGORY_METRICS["color"] == "blip_vqa" and CATEGORY_METRICS["spatial"] == "spatial"
    with pytest.raises(MetricInputError, match="no metric for category 'numeracy'; known categories: color, shape"):
        metric_for_category("numeracy")


# ----------------------------------------------------------------------------- toy oracle


def test_toy_oracle_gives_full_marks_to_the_right_prompt_only():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(c, rng) for c in ("color", "spatial", "texture")]
    images = [Image.fromarray(world.render(s, rng=np.random.default_rng(i))) for i, s in enumerate(scenes)]
    prompts = [world.prompt(s) for s in scenes]
    metric = build_alignment_metric("toy_oracle", batch_size=2, progress=False)
    assert metric.score(images, prompts).tolist() == [1.0, 1.0, 1.0]
    swapped = metric.score(images, prompts[1:] + prompts[:1])
    assert (swapped < 1).all()


def test_toy_objects_counts_what_is_drawn_whatever_the_prompt_names():
    two = world.Scene((world.Obj("circle", "red", "big"), world.Obj("square", "blue", "big")))
    one = world.Scene((world.Obj("triangle", "green", "big"),))
    images = [Image.fromarray(world.render(s, rng=np.random.default_rng(0))) for s in (two, one)]
    metric = build_alignment_metric("toy_objects", progress=False)
    assert metric.score(images, [world.prompt(one), world.prompt(two)]).tolist() == [2.0, 1.0]
    assert metric.score([solid((255, 255, 255), 32)], [world.prompt(one)]).tolist() == [0.0]


def test_toy_oracle_rejects_prompts_outside_its_grammar():
    metric = build_alignment_metric("toy_oracle", progress=False)
    with pytest.raises(MetricInputError, match="prompt 1 .*not a toy-world prompt"):
        metric.score([solid((255, 255, 255), 32)] * 2, ["a red circle", "a photo of a cat"])


# ----------------------------------------------------------------------------- quality math


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_scaled_full_covariances():
    # S2 = c^2 S1 commute, so tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - c)^2 tr(S1).
    a = np.random.default_rng(0).normal(size=(4, 4))
    s1, c = a @ a.T + np.eye(4), 3.0
    mu = np.zeros(4)
    assert frechet_distance(mu, s1, mu, c**2 * s1) == pytest.approx((1 - c) ** 2 * np.trace(s1), rel=1e-8)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-8)


def channel_means(images):
    """A 3-dim stand-in feature extractor: mean RGB / 255."""
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) / 255 for im in images]))


def random_colors(n, seed=0):
    return np.random.default_rng(seed).integers(40, 160, size=(n, 3))


def test_fd_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_norm():
    colors = random_colors(12)
    images = [solid(c) for c in colors]
    shift = np.array([40, 10, 0])
    shifted = [solid(c + shift) for c in colors]
    fd = FrechetDistance(channel_means, batch_size=5, progress=False)
    assert fd.distance(images, images) == pytest.approx(0, abs=1e-8)
    # Same covariance, mean moved by shift / 255: FD = ||shift / 255||^2 exactly.
    assert fd.distance(shifted, images) == pytest.approx(((shift / 255) ** 2).sum(), rel=1e-6)


def test_fd_reads_folders_and_warns_when_the_covariance_is_singular(tmp_path):
    colors = random_colors(3)
    write_folder(tmp_path / "gen", colors, ["p"] * 3)
    write_folder(tmp_path / "ref", colors, ["p"] * 3, metadata=False)
    fid = FID(extractor=channel_means, progress=False)
    with pytest.warns(UserWarning, match="3 images for 3-dim features"):
        assert fid.distance(tmp_path / "gen", tmp_path / "ref") == pytest.approx(0, abs=1e-6)


def test_too_small_or_empty_sets_fail_before_features_are_computed():
    calls = []

    def extractor(images):
        calls.append(len(images))
        return channel_means(images)

    fd = FrechetDistance(extractor, progress=False)
    with pytest.raises(MetricInputError, match="fd needs at least 2 reference, got 1"):
        fd.distance([solid((0, 0, 0))] * 4, [solid((0, 0, 0))])
    with pytest.raises(MetricInputError, match="images is empty"):
        CMMD(extractor, progress=False).distance([], [solid((0, 0, 0))])
    assert calls == []


def test_rbf_mmd_matches_its_closed_form_and_a_direct_double_sum():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 6.0]])  # ||a - b||^2 = 25
    expected = 1000 * 2 * (1 - math.exp(-25 / (2 * 10**2)))
    assert rbf_mmd(a.repeat(3, 1), b.repeat(5, 1)) == pytest.approx(expected, rel=1e-12)

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8
    y = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 8 + 3

    def k(u, v):
        return math.exp(-float(((u - v) ** 2).sum()) / 200)

    def mean_k(p, q):
        return sum(k(u, v) for u in p for v in q) / (len(p) * len(q))

    direct = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    assert rbf_mmd(x, y) == pytest.approx(direct, rel=1e-10)


def test_cmmd_is_zero_for_identical_sets_and_grows_with_the_shift():
    colors = random_colors(8)
    images = [solid(c) for c in colors]

    def scaled(images):  # spread features so the sigma=10 kernel sees the shift
        return channel_means(images) * 100

    cmmd = CMMD(scaled, progress=False)
    assert cmmd.distance(images, images) == pytest.approx(0, abs=1e-9)
    distances = [cmmd.distance([solid(c + s) for c in colors], images) for s in (5, 20, 60)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_fid_without_clean_fid_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cleanfid", None)
    monkeypatch.setitem(sys.modules, "cleanfid.inception_torchscript", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
        FID()


def test_fid_weights_missing_offline_is_one_line_naming_file_and_setting(tmp_path, monkeypatch):
    pytest.importorskip("cleanfid", reason="clean-fid is in the eval extra")
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MissingModelError) as caught:
        FID(weights_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and caught.value.__suppress_context__
    assert f"{tmp_path}/inception-2015-12-05.pt is missing" in message and "Name or service not known" in message
    assert "eval.metric_kwargs.fid.weights_dir=<folder>" in message
    assert list(tmp_path.iterdir()) == []


def test_clean_fid_extractor_resizes_to_299_and_feeds_the_inception_its_0_255_range(tmp_path):
    pytest.importorskip("cleanfid", reason="clean-fid is in the eval extra")

    class Layers(torch.nn.Module):  # stands in for the Inception: the first 2048 normalised pixels
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299)
            return x.flatten(1)[:, :2048]

    class Inception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    torch.jit.save(torch.jit.script(Inception()), str(tmp_path / "inception-2015-12-05.pt"))
    extractor = FID(weights_dir=tmp_path, progress=False).extractor
    features = extractor([solid((200, 200, 200), 64), solid((64, 64, 64), 40)])
    assert features.shape == (2, 2048)
    # A uniform image stays uniform under resizing; clean-fid then maps x to (x - 128) / 128.
    torch.testing.assert_close(features[0], torch.full((2048,), (200 - 128) / 128))
    torch.testing.assert_close(features[1], torch.full((2048,), (64 - 128) / 128))


# ----------------------------------------------------------------------------- spatial rule


def test_position_score_follows_compbench_centroid_rule_on_hand_made_boxes():
    from mitune.metrics.spatial import position_score

    a, right_of_a, below_a = (0, 0, 10, 10), (100, 0, 110, 10), (0, 100, 10, 110)
    assert position_score("on the left of", a, right_of_a) == 1.0
    assert position_score("on the right of", a, right_of_a) == 0.0
    assert position_score("on the right of", right_of_a, a) == 1.0
    assert position_score("on the top of", a, below_a) == 1.0  # y grows downwards
    assert position_score("on top of", a, below_a) == 1.0
    assert position_score("on the bottom of", a, below_a) == 0.0
    assert position_score("on the bottom of", below_a, a) == 1.0
    # Right side, but the other axis dominates: dx = 20, dy = 30.
    diagonal = (20, 30, 30, 40)
    assert position_score("on the left of", a, diagonal) == 0.0
    assert position_score("on the top of", a, diagonal) == 1.0
    # Overlapping boxes: IoU = 60 / 140 >= 0.1, so the score is 0.1 / IoU.
    assert position_score("on the left of", a, (4, 0, 14, 10)) == pytest.approx(0.1 / (60 / 140))
    # near: 1 if either centre distance is under 150 px, else 150 / the larger one.
    assert position_score("near", a, (100, 300, 110, 310)) == 1.0
    assert position_score("next to", a, (300, 400, 310, 410)) == pytest.approx(150 / 400)
    with pytest.raises(MetricInputError, match="unknown spatial relation 'beneath'"):
        position_score("beneath", a, below_a)


def test_spatial_score_weighs_confidences_and_zeroes_totals_under_one_half():
    from mitune.metrics.spatial import Detection, spatial_score

    a, b = (0, 0, 10, 10), (100, 0, 110, 10)
    assert spatial_score("on the left of", Detection(a, 0.6), Detection(b, 0.8)) == pytest.approx(0.25 * 1.4 + 0.5)
    assert spatial_score("on the right of", Detection(a, 1.0), Detection(b, 1.0)) == 0.5  # 0.5 is kept
    assert spatial_score("on the right of", Detection(a, 0.9), Detection(b, 1.0)) == 0.0  # 0.475 is not
    assert spatial_score("on the left of", Detection(a, 1.0), None) == 0.0  # one object: at most 0.25
    assert spatial_score("on the left of", None, None) == 0.0
