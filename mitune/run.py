"""Entry point: ``python -m mitune.run [+exp=<category>] [+experiment=<setup>] [key=value ...]``.

Everything cheap is checked first (prompts, settings, output dir), so a bad value fails in
seconds, before a model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from mitune.generation import run_round
from mitune.io import check_writable
from mitune.prompts import over_length

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    prompts = instantiate(cfg.data).prompts
    generation = instantiate(cfg.generation)
    out_dir = check_writable(Path(cfg.paths.output_dir))
    pipe = instantiate(cfg.model)
    over_length(pipe.tokenizer, prompts)
    summary = run_round(pipe, prompts, generation, out_dir / "round_1")
    print(f"mitune: {summary.num_images} images for {summary.num_prompts} prompts, "
          f"mean MI {summary.mean_mi:.4g} (selected {summary.mean_selected_mi:.4g}); outputs in {out_dir}")
    return summary.mean_selected_mi


if __name__ == "__main__":
    main()
