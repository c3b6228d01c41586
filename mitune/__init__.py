"""MI-TUNE: self-supervised text-to-image alignment with point-wise mutual information."""

from pathlib import Path

from omegaconf import OmegaConf

from mitune.tracking import job_dirname, run_name, sweep_group

ASSETS = Path(__file__).with_name("assets")

# `${mitune.asset:toy-model}` in configs: a file shipped with the package, wherever it is installed.
OmegaConf.register_new_resolver("mitune.asset", lambda name: str(ASSETS / name), replace=True)
# Sweep job dirs, W&B run names and groups (mitune.tracking): `${mitune.job_dirname:}`,
# `${mitune.run_name:${task_name}}`, `${mitune.sweep_group:}`.
OmegaConf.register_new_resolver("mitune.job_dirname", job_dirname, replace=True)
OmegaConf.register_new_resolver("mitune.run_name", run_name, replace=True)
OmegaConf.register_new_resolver("mitune.sweep_group", sweep_group, replace=True)
