"""MI-TUNE: self-supervised text-to-image alignment with point-wise mutual information."""

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).with_name("assets")

# `${mitune.asset:toy-model}` in configs: a file shipped with the package, wherever it is installed.
OmegaConf.register_new_resolver("mitune.asset", lambda name: str(ASSETS / name), replace=True)
