"""MI maps in a generation round and their overlay pictures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mitune.mi.maps import heat, overlay
from mitune.models.loading import load_pipeline
from mitune.rounds.loop import run_round
from mitune.rounds.settings import GenerationConfig

PROMPTS = ["a red apple and a green book", "a blue car"]
CONFIG = GenerationConfig(num_candidates=3, top_k=1, guidance_scale=5.0, num_inference_steps=3, micro_batch=4)


def test_round_saves_maps_that_sum_to_mi_without_changing_the_round(tiny_sd_path, tmp_path):
    pipe = load_pipeline(str(tiny_sd_path))
    plain = run_round(pipe, PROMPTS, CONFIG, tmp_path / "plain", progress=False).path
    mapped = run_round(pipe, PROMPTS, replace(CONFIG, save_mi_maps=True), tmp_path / "maps", progress=False).path
    for pid in range(len(PROMPTS)):
        name = f"latents/{pid:06d}.safetensors"
        with_maps, without = load_file(str(mapped / name)), load_file(str(plain / name))
        assert "mi_maps" not in without
        assert torch.equal(with_maps["latents"], without["latents"])
        assert with_maps["mi_maps"].shape == with_maps["latents"].shape
        assert (with_maps["mi_maps"] >= 0).all()
        torch.testing.assert_close(with_maps["mi_maps"].flatten(1).sum(1), with_maps["mi"], rtol=1e-5, atol=0)
        torch.testing.assert_close(with_maps["mi"], without["mi"], rtol=1e-5, atol=0)
    rows = [json.loads(line) for line in (mapped / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        image = Image.open(mapped / row["file_name"])
        picture = Image.open(mapped / "mi_maps" / f"{row['prompt_id']:06d}_{row['candidate']:03d}.png")
        assert picture.size == image.size
        assert (mapped / row["file_name"]).read_bytes() == (plain / row["file_name"]).read_bytes()


def test_overlay_marks_where_the_map_has_mass():
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    mi_map = torch.zeros(4, 8, 8)
    mi_map[:, 1, 6] = 1.0  # latent row 1, column 6: the image's top-right
    changed = np.abs(np.asarray(overlay(image, mi_map), dtype=float) - 128).sum(2)
    rows, cols = np.nonzero(changed > 1)
    assert rows.mean() < 24 and cols.mean() > 40
    assert np.unravel_index(changed.argmax(), changed.shape) == pytest.approx((12, 52), abs=4)
    assert np.array_equal(np.asarray(overlay(image, torch.zeros(4, 8, 8))), np.asarray(image))
    with pytest.raises(ValueError, match=r"\[C, h, w\]"):
        heat(torch.zeros(8, 8), (64, 64))
