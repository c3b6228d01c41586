"""The Hydra entry point: every config composes, bad input fails fast, killed runs resume."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FIXTURES = REPO / "tests" / "fixtures"
EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
SMALL = ["generation.num_candidates=3", "generation.num_inference_steps=4", "generation.micro_batch=4"]


def cli(*args: str, tiny: Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mitune.run", *args, f"model.path={tiny}"],
        cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout,
    )


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", **extra}


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes_and_loads_its_prompts(exp):
    assert exp in {"color", "shape", "texture", "spatial", "non_spatial", "complex"}
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+exp={exp}", f"data.data_dir={FIXTURES / 'compbench'}", "data.limit=1"])
    assert cfg.data.category == exp and cfg.task_name == exp
    prompts = instantiate(cfg.data).prompts
    assert prompts == [(FIXTURES / "compbench" / f"{exp}_train.txt").read_text().splitlines()[0].strip()]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_a_real_model(experiment):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=color", f"+experiment={experiment}"])
    assert cfg.model._target_ == "mitune.models.load_pipeline"
    assert cfg.model.path_or_id.startswith("stabilityai/")
    generation = instantiate(cfg.generation)
    assert generation.num_candidates == 50 and generation.top_k == 1


def test_authors_code_settings():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["generation=authors_code"])
    g = instantiate(cfg.generation)
    assert (g.num_inference_steps, g.seed_mode, g.mi.include_alpha, g.mi.reduction, g.mi.min_timestep) == (
        100, "shared", False, "mean", 51)


def test_default_run_prints_where_outputs_are(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    result = cli(*SMALL, "data.limit=2", f"hydra.run.dir={out}", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr
    assert f"outputs in {out}" in result.stdout
    assert len((out / "round_1" / "metadata.jsonl").read_text().splitlines()) == 6


def test_multirun_over_all_exps_and_cfg(tiny_sd_path, tmp_path):
    result = cli("-m", "+exp=glob(*)", "generation.guidance_scale=2.5,7.5", "data.limit=1", *SMALL,
                 f"hydra.sweep.dir={tmp_path}", tiny=tiny_sd_path, timeout=600,
                 MITUNE_COMPBENCH_DIR=str(FIXTURES / "compbench"))
    assert result.returncode == 0, result.stderr
    metadata = sorted(tmp_path.glob("*/round_1/metadata.jsonl"))
    assert len(metadata) == 2 * len(EXPS)


@pytest.mark.parametrize(
    "override,msg",
    [
        ("generation.top_k=5", r"top_k must be in \[1, M=3\], got 5"),
        ("generation.guidance_scale=-2", "guidance_scale must be >= 0, got -2"),
        ("generation.num_candidates=0", r"num_candidates \(M\) must be >= 1"),
        ("data.prompts=[]", "no prompts"),
        ("paths.output_dir=/proc/mitune", "output dir /proc/mitune is not writable"),
    ],
)
def test_bad_input_fails_before_the_model_loads(tiny_sd_path, tmp_path, override, msg):
    missing_model = tmp_path / "never-built"
    result = cli(*SMALL, override, f"hydra.run.dir={tmp_path / 'run'}", tiny=missing_model)
    assert result.returncode != 0
    assert re.search(msg, result.stderr), result.stderr[-2000:]
    assert not missing_model.exists()


def test_missing_model_path_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mitune.run", "model=sd21_base", f"model.path_or_id={tmp_path}/no-such-model",
         f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"model path '{tmp_path}/no-such-model' does not exist" in result.stderr


@pytest.mark.slow
def test_run_killed_at_a_random_point_resumes_byte_identical(tiny_sd_path, tmp_path):
    args = [*SMALL, "data.limit=6"]
    full = tmp_path / "full"
    assert cli(*args, f"hydra.run.dir={full}", tiny=tiny_sd_path).returncode == 0

    rng = random.Random(int(os.environ.get("MITUNE_TEST_SEED", "1234")))
    target, delay = rng.randint(1, 5), rng.uniform(0.0, 0.3)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mitune.run", f"model.path={tiny_sd_path}", *args, f"hydra.run.dir={killed}"],
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "round_1" / "parts"
    while proc.poll() is None and len(list(parts.glob("*.jsonl"))) < target:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "round_1" / "metadata.jsonl").exists(), "the run finished before the kill"

    assert cli(*args, f"hydra.run.dir={killed}", tiny=tiny_sd_path).returncode == 0
    round_files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted((d / "round_1").rglob("*")) if p.is_file()}
    assert round_files(killed) == round_files(full)
