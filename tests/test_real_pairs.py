"""The paper's other fine-tuning sets (issue #32): real image-prompt pairs alone or mixed with the MI picks
(``train.real_images``/``real_fraction``), candidates from another generator (``generator``), a round taken from
another run (``rounds_from``), and the experiments that set them up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from mitune import ASSETS
from mitune.config import register, typed
from mitune.models.adapters import export_pipeline
from mitune.models.loading import LatentSpaceError, load_pipeline
from mitune.rounds.data import RoundSet
from mitune.rounds.external import (
    ExternalSetError,
    RealSet,
    check_fraction,
    encode_pairs,
    read_pairs,
)
from mitune.rounds.settings import TrainConfig
from mitune.run import train
from mitune.runs.artifacts import METADATA, RunDir
from mitune.runs.record import RunDirError
from mitune.toy.oracle import score_image
from mitune.toy.prompts import load_toy
from mitune.toy.real import write_real_pairs

register()

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
SMOKE = ["scale=smoke", "logger=csv", "rounds=1"]
# The keys an experiment leaves to the user (???), with values that compose.
REQUIRED = {"mi_real": ["train.real_images=/data/cc3m-512"], "toy_generator": ["generator.path_or_id=/models/toy-r1"]}


def imagefolder(folder: Path, prompts: list[str], size: int = 32, seed: int = 0) -> Path:
    """Random images of ``size`` px with their prompts, as an imagefolder."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        name = f"images/{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "prompt": prompt})
    (folder / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ----------------------------------------------------------------------------- the folder, checked before training


def test_pairs_are_read_with_a_digest_of_their_bytes(tmp_path):
    pairs = read_pairs(imagefolder(tmp_path, ["a cat", "a dog"]))
    assert pairs.prompts == ["a cat", "a dog"] and pairs.size == (32, 32) and len(pairs.files) == 2
    Image.new("RGB", (32, 32)).save(pairs.files[1])  # same names, other pixels: another set
    assert read_pairs(tmp_path).digest != pairs.digest


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / METADATA).write_text('{"file_name": "images/0000.png", "prompt": "a"}\n'
                                         '{"file_name": "images/0001.png", "caption": "b"}\n'),
     r"metadata.jsonl:2: no 'prompt'"),
    (lambda f: (f / "images/0001.png").write_bytes(b"not a png"),
     r"metadata.jsonl:2: image 'images/0001.png' is missing or unreadable"),
    (lambda f: (f / "images/0001.png").unlink(), r"metadata.jsonl:2: image 'images/0001.png' is missing"),
    (lambda f: Image.new("RGB", (16, 16)).save(f / "images/0001.png"),
     r"metadata.jsonl:2: image 'images/0001.png' is 16x16, the folder's first is 32x32"),
    (lambda f: (f / METADATA).write_text('{"file_name": "../x.png", "prompt": "a"}\n'),
     r":1: file_name '../x.png' is outside"),
    (lambda f: (f / METADATA).write_text('{"file_name": "images/0000.png", "prompt": "a"}\nnot json\n'),
     r"metadata.jsonl:2: not a JSON object"),
    (lambda f: (f / METADATA).unlink(), r"has no metadata.jsonl"),
])
def test_a_bad_folder_fails_naming_the_file_and_line(tmp_path, damage, message):
    folder = imagefolder(tmp_path / "pairs", ["a", "b"])
    damage(folder)
    with pytest.raises(ExternalSetError, match=message) as err:
        read_pairs(folder)
    assert "\n" not in str(err.value)


def test_another_prompt_column_is_read(tmp_path):
    folder = imagefolder(tmp_path, ["a"])
    (folder / METADATA).write_text('{"file_name": "images/0000.png", "text": "a caption"}\n')
    assert read_pairs(folder, "text").prompts == ["a caption"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"real_fraction": 0.5}, "real_images and train.real_fraction > 0 go together"),
    ({"real_images": "/x"}, "real_images and train.real_fraction > 0 go together"),
    ({"real_images": "/x", "real_fraction": 1.5}, r"real_fraction must be in \[0, 1\]"),
])
def test_the_settings_go_together(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


# ----------------------------------------------------------------------------- what 0.25 means


def selected_set(n: int, r: int = 1) -> RoundSet:
    return RoundSet(r, torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), [f"p{i}" for i in range(n)],
                    torch.arange(n))


def real_set(n: int, fraction: float, seed: int = 0) -> RealSet:
    return RealSet(-1 - torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), [f"real{i}" for i in range(n)],
                   fraction, seed)


@pytest.mark.parametrize(("fraction", "real"), [(0.25, 2), (0.5, 4), (0.9, 7), (0.0, 0)])
def test_a_fraction_replaces_that_share_of_the_selected_set_keeping_its_size(fraction, real):
    mixed = real_set(20, fraction).mix(selected_set(8))
    values = mixed.latents.flatten()
    assert len(values) == 8 and int((values < 0).sum()) == real  # round(f N) real, N - round(f N) selected
    assert len(set(values.tolist())) == 8  # without replacement on both sides
    rows = [mixed.prompts[i] for i in mixed.prompt_index.tolist()]
    assert all(p == (f"real{-int(v) - 1}" if v < 0 else f"p{int(v)}") for p, v in zip(rows, values.tolist()))


def test_the_draw_is_a_function_of_seed_and_round():
    draw = lambda seed, r: real_set(20, 0.5, seed).mix(selected_set(8, r)).latents.flatten().tolist()
    assert draw(0, 1) == draw(0, 1)
    assert draw(0, 1) != draw(1, 1) and draw(0, 1) != draw(0, 2)


def test_a_fraction_the_folder_cannot_fill_fails_before_training(tmp_path):
    pairs = read_pairs(imagefolder(tmp_path, ["a", "b"]))
    check_fraction(0.25, 8, pairs)
    with pytest.raises(ExternalSetError, match=r"real_fraction=0.5 of a round's 8 selected images is 4 real pairs"):
        check_fraction(0.5, 8, pairs)


# ----------------------------------------------------------------------------- encoding, once


def test_the_toy_models_vae_reads_back_the_encoded_scenes(tmp_path):
    """The cached latents are the model's own: decoded, the toy scenes come back (the scaling is the pipeline's)."""
    from mitune.mi.pipeline import decode_latents

    pipe = load_pipeline(str(ASSETS / "toy-model"))
    prompts = load_toy("train", 1).prompts
    pairs = read_pairs(write_real_pairs(tmp_path / "real", prompts))
    latents = encode_pairs(pipe, pairs, tmp_path / "cache")
    decoded = np.stack([np.asarray(im, dtype=np.float32) for im in decode_latents(pipe, latents)])
    original = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in pairs.files])
    assert np.abs(decoded - original).mean() < 12  # of 255: the toy VAE's reconstruction error
    assert all(score_image(p, Image.open(f)) == 1.0 for p, f in zip(pairs.prompts, pairs.files))  # aligned scenes


def test_latents_are_encoded_once_and_again_for_another_set(tmp_path, tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    folder = imagefolder(tmp_path / "pairs", ["a", "b", "c"])
    cache = tmp_path / "cache"
    first = encode_pairs(pipe, read_pairs(folder), cache)
    (chunk,) = cache.iterdir()
    save_file({"latents": torch.zeros(first.shape)}, str(chunk), metadata={"digest": read_pairs(folder).digest})
    assert torch.equal(encode_pairs(pipe, read_pairs(folder), cache), torch.zeros(first.shape))  # the cache is read
    imagefolder(folder, ["a", "b", "c"], seed=1)  # other images: another digest, encoded again
    again = encode_pairs(pipe, read_pairs(folder), cache)
    assert not torch.equal(again, torch.zeros(first.shape)) and not torch.equal(again, first)


# ----------------------------------------------------------------------------- end to end on the tiny model


@pytest.fixture
def tiny(task_config, tiny_sd_path):
    return lambda run_dir, *overrides: task_config(
        "config", ["model=tiny", f"model.path_or_id={tiny_sd_path}", "data=demo", "data.limit=4", *SMOKE, *overrides],
        run_dir)


@pytest.mark.slow
def test_mi_plus_real_trains_on_the_mix_and_a_resume_with_another_folder_is_refused(tiny, tmp_path):
    folder = imagefolder(tmp_path / "pairs", [f"real caption {i}" for i in range(6)])
    run_dir = tmp_path / "run"
    overrides = [f"train.real_images={folder}", "train.real_fraction=0.5"]
    train(tiny(run_dir, *overrides))
    record = yaml.safe_load(RunDir(run_dir).config_record.read_text())
    assert record["real_set"] == read_pairs(folder).record()
    assert len(load_file(str(next(RunDir(run_dir).external.iterdir())))["latents"]) == 6
    assert RunDir(run_dir).round(1).is_complete() and (RunDir(run_dir).round(1).adapter).is_dir()
    imagefolder(folder, [f"real caption {i}" for i in range(6)], seed=1)
    with pytest.raises(RunDirError, match=r"real_set\.digest"):
        train(tiny(run_dir, *overrides, "resume=true"))


@pytest.mark.slow
def test_real_pairs_alone_generate_nothing(tiny, tmp_path):
    folder = imagefolder(tmp_path / "pairs", ["a", "b", "c"])
    run_dir = tmp_path / "run"
    train(tiny(run_dir, f"train.real_images={folder}", "train.real_fraction=1"))
    assert not RunDir(run_dir).round(1).metadata.exists() and RunDir(run_dir).adapter.is_dir()


@pytest.mark.slow
def test_images_of_another_size_than_the_models_fail_before_training(tiny, tmp_path):
    folder = imagefolder(tmp_path / "pairs", ["a", "b"], size=16)
    with pytest.raises(ExternalSetError, match=r"images are 16x16, the model generates 32x32"):
        train(tiny(tmp_path / "run", f"train.real_images={folder}", "train.real_fraction=1"))
    assert not RunDir(tmp_path / "run").checkpoints.exists()


def copy_model(source: Path, out: Path, part: str) -> Path:
    """A copy of a pipeline folder with ``part``'s weights changed."""
    shutil.copytree(source, out)
    for f in (out / part).glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(f))
    return out


@pytest.mark.slow
def test_candidates_from_another_generator_sharing_the_vae(tiny, tiny_sd_path, tmp_path):
    generator = copy_model(Path(tiny_sd_path), tmp_path / "gen", "unet")
    node = f"{{_target_: mitune.models.load_pipeline, path_or_id: '{generator}', torch_dtype: float32, device: cpu}}"
    run_dir = tmp_path / "run"
    train(tiny(run_dir, f"generator={node}"))
    settings = json.loads(RunDir(run_dir).round(1).settings_file.read_text())
    assert settings["model"] == str(generator)
    assert "generator_weights" in yaml.safe_load(RunDir(run_dir).config_record.read_text())
    mine = tmp_path / "mine"
    train(tiny(mine))
    rows = lambda d: [json.loads(x)["mi"] for x in RunDir(d).round(1).metadata.read_text().splitlines()]
    assert rows(run_dir) != rows(mine)  # the other UNet sampled and scored them

    other_vae = copy_model(Path(tiny_sd_path), tmp_path / "gen-vae", "vae")
    node = node.replace(str(generator), str(other_vae))
    with pytest.raises(LatentSpaceError, match=r"other VAE weights"):
        train(tiny(tmp_path / "refused", f"generator={node}"))
    assert not RunDir(tmp_path / "refused").rounds_dir.exists()


@pytest.mark.slow
def test_a_round_taken_from_another_run_trains_bit_identically(tiny, tmp_path):
    folder = imagefolder(tmp_path / "pairs", [f"c{i}" for i in range(4)])
    source, taken, own = tmp_path / "source", tmp_path / "taken", tmp_path / "own"
    train(tiny(source))
    mixed = [f"train.real_images={folder}", "train.real_fraction=0.25"]
    train(tiny(taken, *mixed, f"rounds_from={source}"))
    train(tiny(own, *mixed))
    adapter = lambda d: load_file(str(RunDir(d).adapter / "pytorch_lora_weights.safetensors"))
    a, b = adapter(taken), adapter(own)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"different settings \(generation\)"):
        train(tiny(tmp_path / "other", "generation.guidance_scale=2.0", f"rounds_from={source}"))


@pytest.mark.slow
def test_round_one_of_another_run_is_ranked_again_by_this_runs_selection_and_later_rounds_are_its_own(tiny, tmp_path):
    """A run with another selector takes round 1's candidates and selects them itself (equal to generating them);
    round 2 comes from the model this run trained, never from the other run's round 2."""
    adapter = lambda d: load_file(str(RunDir(d).adapter / "pytorch_lora_weights.safetensors"))  # noqa: E731
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    parts = lambda d: sorted(p.read_bytes() for p in (RunDir(d).round(1).path / "parts").iterdir())  # noqa: E731
    source, taken, own = tmp_path / "source", tmp_path / "taken", tmp_path / "own"
    train(tiny(source, "rounds=2", "generation.num_candidates=3"))
    other = ["rounds=2", "generation.num_candidates=3", "generation.selection=random"]
    train(tiny(taken, *other, f"rounds_from={source}"))
    train(tiny(own, *other))
    assert parts(taken) == parts(source) == parts(own)  # one set of candidates, generated once
    picks = lambda d: [r["candidate"] for r in RunDir(d).round(1).rows() if r["selected"]]  # noqa: E731
    assert picks(taken) == picks(own) != picks(source)
    assert same(adapter(taken), adapter(own))  # round 2 generated by its own model
    assert not same(adapter(taken), adapter(source))
    with pytest.raises(ValueError, match=r"different settings \(generation\)"):  # phrase MI was not computed
        train(tiny(tmp_path / "phrase", "generation.num_candidates=3", "generation.selection=phrase_mi",
                   f"rounds_from={source}"))


# ----------------------------------------------------------------------------- the toy world


@pytest.mark.slow
def test_toy_mi_plus_real_and_a_toy_generator_end_to_end(task_config, tmp_path):
    toy = ["+experiment=toy_real", *SMOKE, "data.per_category=1"]
    pairs = tmp_path / "pairs"
    write_real_pairs(pairs, load_toy("train", 1).prompts)
    run_dir = tmp_path / "mixed"
    train(task_config("config", [*toy, f"train.real_images={pairs}", "train.real_fraction=0.4"], run_dir))
    fused = export_pipeline(str(ASSETS / "toy-model"), RunDir(run_dir).adapter, tmp_path / "toy-r1")
    gen_run = tmp_path / "generator"
    train(task_config("config", ["+experiment=toy_generator", *SMOKE, "data.per_category=1",
                                 f"generator.path_or_id={fused}"], gen_run))
    assert json.loads(RunDir(gen_run).round(1).settings_file.read_text())["model"] == str(fused)


# ----------------------------------------------------------------------------- the experiments


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("task", ["config", "evaluate"])
def test_every_experiment_composes_and_types(experiment, task):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(task, overrides=[f"+experiment={experiment}", *REQUIRED.get(experiment, [])])
    train_config = typed(cfg.train, TrainConfig, "train")
    OmegaConf.to_container(cfg.generator, resolve=True) if cfg.generator is not None else None
    if experiment in ("mi_real", "diffusiondb_images", "toy_real"):
        assert train_config.real_images and train_config.real_fraction > 0
    if experiment == "spright":
        assert cfg.generator.path_or_id == "SPRIGHT-T2I/spright-t2i-sd2" and cfg.model.path_or_id != cfg.generator.path_or_id


def test_mi_real_asks_for_its_folder():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=color", "+experiment=mi_real"])
    with pytest.raises(ValueError, match=r"train\.real_images"):
        typed(cfg.train, TrainConfig, "train")


def test_diffusiondb_images_are_written_as_the_pairs_the_baseline_reads(tmp_path):
    """``python -m mitune.prompts.diffusiondb --images`` on a local metadata table and image parts (no hub)."""
    import io
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mitune.prompts.diffusiondb import export_pairs

    rows = [(f"img{i}.webp", f"prompt {i % 12}", 1 + i % 3, 0.05 if i != 5 else 0.9) for i in range(30)]
    pq.write_table(pa.table({"image_name": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                             "part_id": [r[2] for r in rows], "prompt_nsfw": [r[3] for r in rows]}),
                   tmp_path / "metadata.parquet")
    for part in (1, 2, 3):
        with zipfile.ZipFile(tmp_path / f"part-{part}.zip", "w") as archive:
            for name, _, p, _ in rows:
                if p == part:
                    buffer = io.BytesIO()
                    Image.new("RGB", (96, 64), (part * 60, 0, 0)).save(buffer, format="WEBP")
                    archive.writestr(name, buffer.getvalue())
    fetched = []
    out = export_pairs(tmp_path / "ddb", num_train=4, num_test=3, source=str(tmp_path / "metadata.parquet"), parts=2,
                       size=32, fetch=lambda part: fetched.append(part) or tmp_path / f"part-{part}.zip")
    pairs = read_pairs(out / "images")
    train = (out / "train.txt").read_text().splitlines()
    assert sorted(pairs.prompts) == sorted(train) and len(train) == 4 and pairs.size == (32, 32)
    assert set(fetched) <= {1, 2} and not set(train) & set((out / "test.txt").read_text().splitlines())
    first_part = {r[1]: r[2] for r in reversed(rows)}  # each prompt's first image's part
    for prompt, f in zip(pairs.prompts, pairs.files):
        assert Image.open(f).getpixel((16, 16))[0] == pytest.approx(first_part[prompt] * 60, abs=8)
