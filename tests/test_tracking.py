"""W&B runs offline unless credentials are configured, and the helper stays cheap to import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mitune.runs.tracking import name_part, run_name, sweep_group, wandb_offline_without_key


def test_wandb_goes_offline_without_mode_or_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb_offline_without_key()
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("name, value", [("WANDB_MODE", "online"), ("WANDB_MODE", "disabled"), ("WANDB_API_KEY", "key")])
def test_wandb_settings_are_left_alone_when_either_is_set(monkeypatch, name, value):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv(name, value)
    before = dict(os.environ)
    wandb_offline_without_key()
    assert dict(os.environ) == before


def test_summary_does_not_import_lightning_or_hydra():
    code = "import sys, mitune.summary; print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra', 'wandb'}))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


def test_outside_a_sweep_a_run_is_named_by_its_task_and_has_no_group():
    assert (run_name("color"), sweep_group()) == ("color", None)


def test_swept_values_are_named_shortly():
    assert name_part("generation.guidance_scale", "2.5") == "cfg2.5"
    assert name_part("generation.num_candidates", "16") == "M16"
    assert name_part("train.lr", "0.001") == "lr=0.001"


def test_sweep_job_dirs_can_be_passed_back_as_run_dir():
    """A training sweep's job dir was `+exp=color,generation.guidance_scale=2.5`: Hydra's grammar refuses it as
    `run_dir=<that dir>` without nested quoting. The names are plain now, and parse back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mitune.runs.tracking import dirname_of

    parser = OverridesParser.create()
    swept = parser.parse_overrides(["+exp=color", "generation.guidance_scale=2.5", "data.prompt_file='my prompts, v2.txt'"])
    name = dirname_of(swept)
    assert name == "exp-color__generation.guidance_scale-2.5__data.prompt_file-my_prompts__v2.txt"
    path = f"outputs/multiruns/2026-01-01_00-00-00/{name}"
    [override] = parser.parse_overrides([f"run_dir={path}"])
    assert override.value() == path
    with pytest.raises(Exception, match="mismatched input"):  # the old name, for contrast
        parser.parse_overrides(["run_dir=outputs/multiruns/t/+exp=color,generation.guidance_scale=2.5"])
