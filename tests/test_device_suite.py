"""benchmarks/device.py, the GPU suite for a short lease: every command it would run is valid, and its
time limits, budget and smoke-run stop behave, so a lent GPU's minutes are not spent on a typo."""

import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import mitune.config

mitune.config.register()  # the settings dataclasses' defaults that conf/ composes

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def device(load_benchmark):
    return load_benchmark("device")


@pytest.fixture(scope="module")
def gpu(load_benchmark):
    return load_benchmark("gpu")


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_every_benchmark_command_parses(device, gpu, target, tmp_path):
    runs = [r for r in device.suite(target) if r.args[0] == device.GPU]
    assert [r.name for r in runs][:2] == ["smoke", "sd21"]  # the targets come first
    for run in runs:
        cmd = device.command(run, target, tmp_path / "out", tmp_path / "scratch")
        args = gpu.parse_args(cmd[2:])
        assert args.device == target
        assert args.out.parent == (tmp_path / "out" if run.result else tmp_path / "scratch")
        if run.result:
            assert args.out.name == f"gpu_{target}_{run.name}.md"
    if target == "cuda":
        sd21 = gpu.parse_args(device.command(runs[1], "cuda", tmp_path, tmp_path)[2:])
        assert (sd21.model, sd21.latent, sd21.gen_batches) == ("sd21", 64, [25, 50, 100])  # 512 px, M=50 included
        assert (sd21.train_batch, sd21.accumulation, sd21.adapters) == (16, 25, list(gpu.ADAPTERS))  # batch 400
        assert "sdxl" in [r.name for r in runs]


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_main_job_command_composes_without_wandb(device, target, tmp_path):
    """The lent machine has no wandb: the main job there logs to CSV only."""
    (run,) = [r for r in device.suite(target) if r.name == "run"]
    cmd = device.command(run, target, tmp_path, tmp_path)
    assert cmd[1:3] == ["-m", "mitune.run"]
    overrides = [a for a in cmd[3:] if not a.startswith("hydra.")]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert list(cfg.logger) == ["csv"]
    assert cfg.trainer.accelerator == target


def fake(code: str) -> list[str]:
    return ["-c", code]


def test_limits_budget_and_required_smoke(device, monkeypatch, tmp_path):
    marker = tmp_path / "grandchild-survived"
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time, pathlib; time.sleep(3); pathlib.Path(r\"{marker}\").touch()']); import time; time.sleep(60)"
    runs = [
        device.Run("first", 10, fake("print('hello from first')"), required=True),
        device.Run("slow", 1, fake(child)),
        device.Run("broken", 10, fake("raise SystemExit(3)")),
        device.Run("late", 60, fake("print('never')")),
    ]
    monkeypatch.setattr(device, "suite", lambda _: runs)
    monkeypatch.setattr(device, "MIN_RUN_S", 100)  # so a run starts only with its whole limit left
    rows = device.main(["--device", "cpu", "--out", str(tmp_path), "--budget", "40"])
    status = {name: s for name, s, _, _ in rows}
    assert status["first"] == "ok"
    assert status["slow"] == "killed at its 1 s limit"
    assert status["broken"] == "failed (exit 3)"
    assert status["late"] == "skipped: budget spent"  # 60 s limit, < 40 s left
    log = (tmp_path / "gpu_cpu.log").read_text()
    assert "hello from first" in log and "never" not in log
    table = (tmp_path / "gpu_cpu_runs.md").read_text()
    assert "| slow | killed at its 1 s limit |" in table and "--budget 40" in table
    time.sleep(4)
    assert not marker.exists()  # the whole process group was killed, not just the child


def test_failed_smoke_run_skips_the_rest(device, monkeypatch, tmp_path):
    runs = [device.Run("smoke", 30, fake("import nonexistent_module"), required=True),
            device.Run("sd21", 30, fake("print('measured')"))]
    monkeypatch.setattr(device, "suite", lambda _: runs)
    rows = device.main(["--device", "cpu", "--out", str(tmp_path)])
    assert [(n, s) for n, s, _, _ in rows] == [("smoke", "failed (exit 1)"), ("sd21", "skipped: smoke failed (exit 1)")]
    assert "ModuleNotFoundError" in (tmp_path / "gpu_cpu.log").read_text()


def test_children_find_the_checkout(device, monkeypatch, tmp_path):
    """On the lent machine mitune is not installed: the suite puts the checkout first on the path."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    runs = [device.Run("where", 30, fake("import os; print('PATH_IS', os.environ['PYTHONPATH'])"))]
    monkeypatch.setattr(device, "suite", lambda _: runs)
    device.main(["--device", "cpu", "--out", str(tmp_path)])
    line = next(x for x in (tmp_path / "gpu_cpu.log").read_text().splitlines() if x.startswith("PATH_IS"))
    assert line.split()[1].split(os.pathsep) == [str(ROOT), "/elsewhere"]
