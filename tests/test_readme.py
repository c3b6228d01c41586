"""The README's commands, as written: valid shell, every Hydra job composes, and those that need no
network or GPU run (outputs sent to a temporary dir, T2I-CompBench prompts from the test fixtures
standing in for `make data`)."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.utils import instantiate

import mitune.config

mitune.config.register()  # the config resolvers and the settings defaults conf/ composes

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FIXTURES = REPO / "tests" / "fixtures"
# Commands that need neither the network nor a GPU nor earlier outputs, run in full below.
OFFLINE = [
    "python -m mitune.run data.limit=5 generation.num_candidates=8 rounds=1",
    "python -m mitune.run +exp=color model=tiny",
]


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks: continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split(" #")[0].split()) for line in lines if line.strip()]


COMMANDS = readme_commands()
HYDRA = [c for c in COMMANDS if re.match(r"python -m mitune\.(run|evaluate) ", c)]


def test_the_readme_has_the_commands_this_file_runs():
    assert set(OFFLINE) <= set(COMMANDS)
    assert any(" -m '+exp=glob(*)' " in c for c in HYDRA)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_valid_shell_without_placeholders(command):
    result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not any(c in "<>" for token in shlex.split(command) for c in token), "a <placeholder> is a redirection"


@pytest.mark.parametrize("target", sorted({c.split()[1] for c in COMMANDS if c.startswith("make ")}))
def test_make_target_exists(target):
    result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs a multirun makes of ``overrides``, as Hydra's basic sweeper expands them."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if isinstance(override.value(), Glob):  # a config group: its options in conf/
            values = override.value().filter(sorted(p.stem for p in (CONF / override.key_or_group).glob("*.yaml")))
        elif override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        choices.append([f"{key}={value}" for value in values])
    return [list(job) for job in itertools.product(*choices)]


@pytest.mark.parametrize("command", HYDRA)
def test_every_job_of_the_command_composes(command):
    module, *args = shlex.split(command)[2:]
    sweep = "-m" in args
    expanded = jobs([a for a in args if a != "-m"])
    assert (len(expanded) > 1) == (sweep and any("," in a or "glob(" in a for a in args))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for job in expanded:
            cfg = compose("evaluate" if module.endswith("evaluate") else "config", overrides=job)
            for group in ("generation", "train", "adapter"):
                instantiate(cfg[group])  # their values are checked when they are built


@pytest.mark.slow
@pytest.mark.parametrize("command", OFFLINE)
def test_offline_command_runs(command, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MITUNE_COMPBENCH_DIR": str(FIXTURES / "compbench"), "MITUNE_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "run"
    result = subprocess.run(["bash", "-c", f"{command} hydra.run.dir={out}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert f"outputs in {out}" in result.stdout


def test_the_mi_library_example_runs_as_written(monkeypatch):
    """The README's "MI as a library" block, run from the repository root on the toy model it names."""
    [block] = re.findall(r"## MI as a library\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].latents.shape[0] == len(scope["mi"]) == 4
    assert (scope["out"].mi > 0).all() and (scope["mi"] > 0).all()
    assert scope["scores"].shape == (4,) and scope["scores"].isfinite().all()  # the image-level scorer it names
