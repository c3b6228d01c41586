"""Entry point: ``python -m mitune.run [+exp=<category>] [+experiment=<setup>] [key=value ...]``.

Runs R rounds of MI-TUNE. Everything cheap is checked first (prompts, settings, output
dir, batch arithmetic), so a bad value fails in seconds, before a model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from mitune.console import quiet_libraries  # first: quiets library loggers before the imports below load them
from mitune.callbacks import FinetuneData, MIRounds
from mitune.checkpoint import SafetensorsCheckpointIO, latest_checkpoint, read_state
from mitune.io import check_writable
from mitune.prompts import over_length
from mitune.tracking import run_config, setup_wandb, wandb_summary
from mitune.training import MITuneModule, accumulation_steps

log = logging.getLogger(__name__)


def resolve_resume(resume: bool | str, out_dir: Path) -> Path | None:
    """``true``: the newest checkpoint of this run dir (none yet: start fresh); a path: that one."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = latest_checkpoint(out_dir / "checkpoints")
        log.info("resuming from %s", found) if found else log.info("resume=true but no checkpoint yet: starting fresh")
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    return path


def precision(value: str) -> str:
    """'auto' = bf16 mixed precision where the GPU supports it, full fp32 elsewhere."""
    if value != "auto":
        return value
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def make_loggers(cfg: DictConfig, ckpt: Path | None) -> list:
    """W&B runs offline without credentials, and a resumed run continues its W&B run."""
    if "wandb" in cfg.logger:
        setup_wandb()
    run_id = read_state(ckpt).get("wandb_run_id") if ckpt else None
    loggers = []
    for name, spec in cfg.logger.items():
        extra = {"id": run_id} if name == "wandb" and run_id else {}
        loggers.append(instantiate(spec, **extra))
    return loggers


def finish_wandb(loggers: list) -> None:
    """Close W&B even after a failure, so a failed multirun job does not break the sweep."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            log.info(wandb_summary(wandb.run))
        wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {cfg.rounds}")
    prompts = instantiate(cfg.data).prompts
    generation = instantiate(cfg.generation)
    adapter = instantiate(cfg.adapter)
    train = instantiate(cfg.train)
    out_dir = check_writable(Path(cfg.paths.output_dir))
    ckpt = resolve_resume(cfg.resume, out_dir)
    base_model = str(cfg.model.get("path_or_id", cfg.model.get("path")))
    rounds = MIRounds(prompts, generation, out_dir, base_model=base_model)
    callbacks = [instantiate(spec) for spec in cfg.callbacks.values()] + [rounds]
    loggers = make_loggers(cfg, ckpt)
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[SafetensorsCheckpointIO()],
                              precision=precision(cfg.trainer.precision))
        trainer.accumulate_grad_batches = accumulation_steps(train.effective_batch, train.micro_batch, trainer.world_size)
        config = run_config(cfg, accumulate_grad_batches=trainer.accumulate_grad_batches, world_size=trainer.world_size)
        for lg in loggers:
            lg.log_hyperparams(config)
        pipe = instantiate(cfg.model)
        over_length(pipe.tokenizer, prompts)
        module = MITuneModule(pipe, adapter, train)
        trainer.fit(module, datamodule=FinetuneData(rounds, train), ckpt_path=ckpt)
    finally:
        finish_wandb(loggers)
    if trainer.is_global_zero:
        print(f"mitune: {cfg.rounds} round(s) done; adapter in {out_dir / 'adapter'}, "
              f"rounds (images, MI, adapters) in {out_dir / 'rounds'}; outputs in {out_dir}")
    return float(trainer.callback_metrics.get("train/loss", float("nan")))


if __name__ == "__main__":
    main()
