"""Entry point: ``python -m mitune.run [+exp=<category>] [+experiment=<setup>] [key=value ...]``.

Runs R rounds of MI-TUNE. Everything cheap is checked first (prompts, settings, output
dir, batch arithmetic), so a bad value fails in seconds, before a model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# First: quiets library loggers before the imports below load them.
from mitune.runs.console import hydra_task, one_line_errors, quiet_libraries
from mitune.config import RunSettings, register, typed
from mitune.models.adapters import AdapterConfig
from mitune.models.loading import LatentSpaceError, check_latent_space, model_weights
from mitune.models.weights import ModelLoadError, Weights
from mitune.prompts.sources import over_length
from mitune.rounds.data import FinetuneData
from mitune.rounds.external import ExternalSetError, Pairs, RealSet, check_fraction, check_size, encode_pairs, read_pairs
from mitune.rounds.loop import MIRounds
from mitune.rounds.module import MITuneModule, accumulation_steps
from mitune.rounds.selection import check_strategy
from mitune.rounds.settings import GenerationConfig, TrainConfig
from mitune.runs.artifacts import RunDir
from mitune.runs.checkpoints import SafetensorsCheckpointIO, latest_checkpoint, read_state
from mitune.runs.io import check_writable
from mitune.runs.loggers import ResumableCSVLogger
from mitune.runs.preemption import EXIT_STATUS, Preempted, SigtermStop
from mitune.runs.record import RunDirError, check_config, exclusive, prompt_record, remove_temporaries
from mitune.runs.tracking import finish_wandb, make_loggers, run_config, save_hydra_files, start_wandb

log = logging.getLogger(__name__)
register()  # conf/ composes the settings' defaults and the ${mitune.*} resolvers


def resolve_resume(resume: bool | str, out_dir: Path) -> Path | None:
    """``true``: the newest checkpoint of this run dir (none yet: start fresh); a path: that one."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = latest_checkpoint(RunDir(out_dir).checkpoints)
        log.info("resuming from %s", found) if found else log.info("resume=true but no checkpoint yet: starting fresh")
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    checkpoints = RunDir(out_dir).checkpoints
    if not path.resolve().is_relative_to(checkpoints.resolve()):
        raise RunDirError(f"resume={path} is not a checkpoint of this run dir ({checkpoints}): a run dir holds one run, "
                          "and this one would hold rounds it did not make; resume that run in its own dir "
                          "(hydra.run.dir=<its dir> resume=true), or start this one fresh")
    return path


def precision(value: str) -> str:
    """'auto' = bf16 mixed precision where the GPU supports it, full fp32 elsewhere.

    Lightning's "*-true" half precisions cast the whole module, adapters included, to half; AdamW
    updates of the adapter weights would then round away, so only mixed precision is accepted.
    """
    if value in ("bf16-true", "16-true"):
        raise ValueError(f"trainer.precision={value} would train the adapter weights in half precision, where "
                         "AdamW updates round away; use bf16-mixed (bf16 compute, fp32 adapter weights)")
    if value != "auto":
        return value
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


# Trainer settings that would break rounds: key -> (the values that work, why). ``max_epochs`` must
# equal ``rounds`` (one epoch is one round), checked on its own.
ROUND_SAFE = {
    "max_steps": ((-1, None), "a round trains train.steps_per_round optimizer steps; stop early with SIGTERM"),
    "limit_train_batches": ((None, 1, 1.0), "a round's length is train.steps_per_round"),
    "accumulate_grad_batches": ((None,), "mitune derives it from train.effective_batch and train.micro_batch"),
    "use_distributed_sampler": ((False, None), "mitune's sampler deals each step's samples to the ranks "
                                               "(Lightning's would change the samples and break resume)"),
    "fast_dev_run": ((False, 0, None), "it skips checkpoints and rounds; use rounds=1 train.steps_per_round=1"),
    "overfit_batches": ((0, 0.0, None), "a round's set is its own training data"),
}


def check_trainer(trainer: DictConfig, rounds: int) -> None:
    """Refuse trainer settings under which the rounds would not run as configured, before the model loads."""
    if trainer.get("max_epochs") != rounds:
        raise ValueError(f"trainer.max_epochs={trainer.get('max_epochs')} would break the rounds: one epoch is one "
                         f"round: it follows `rounds`; it must be = rounds ({rounds})")
    for key, (allowed, why) in ROUND_SAFE.items():
        if trainer.get(key) not in allowed:
            raise ValueError(f"trainer.{key}={trainer.get(key)} would break the rounds: {why}; it must be "
                             + " or ".join(map(str, allowed)))


def check_schedule(folder: Path, generation: GenerationConfig) -> None:
    """Sampling settings the model's noise schedule cannot serve, refused from its scheduler_config.json before
    the model loads (a model without one is left to diffusers)."""
    config = Path(folder) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return
    num_t = json.loads(config.read_text(encoding="utf-8")).get("num_train_timesteps", 1000)
    if generation.num_inference_steps > num_t:
        raise ValueError(f"generation.num_inference_steps={generation.num_inference_steps} exceeds the model's "
                         f"{num_t} timesteps ({config}); it must be <= {num_t}")
    if generation.mi.min_timestep >= num_t:
        raise ValueError(f"generation.mi.min_timestep={generation.mi.min_timestep} leaves no timestep of the model's "
                         f"{num_t} ({config}): every MI would be 0; it must be < {num_t}")


def resume_command(argv: list[str], out_dir: Path) -> str:
    """The command that resumes this run, each argument shell-quoted (``data.prompts=[a red circle,...]``)."""
    kept = [a for a in argv if not a.startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["python", "-m", "mitune.run", *kept, f"hydra.run.dir={out_dir}", "resume=true"])


def launching_process() -> bool:
    """False in the extra ranks Lightning DDP or a cluster starts: the launching process holds the
    run dir's lock and has checked its config for them."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def train(cfg: DictConfig) -> float:
    """R rounds of MI-TUNE; every setting and the run dir are checked before the model loads."""
    typed(OmegaConf.masked_copy(cfg, ["rounds", "seed"]), RunSettings)
    generation = typed(cfg.generation, GenerationConfig, "generation")
    adapter = typed(cfg.adapter, AdapterConfig, "adapter")
    train_config = typed(cfg.train, TrainConfig, "train")
    check_trainer(cfg.trainer, cfg.rounds)
    prompt_set = instantiate(cfg.data)
    prompts = prompt_set.prompts
    check_strategy(generation.selection, prompts)
    out_dir = check_writable(Path(cfg.paths.output_dir))
    RunDir(out_dir).check_inside(cfg.rounds)  # a linked round or checkpoints dir would write elsewhere
    # Before the weights are fetched and hashed: what can be checked without a Trainer.
    precision(cfg.trainer.precision)
    accumulation_steps(train_config.effective_batch, train_config.micro_batch)  # unreachable on any device count
    if isinstance(cfg.resume, str):
        resolve_resume(cfg.resume, out_dir)
    pairs = None
    if train_config.real_images is not None:  # every line and image checked, and hashed, before any model loads
        pairs = read_pairs(train_config.real_images, train_config.real_prompt_column)
        check_fraction(train_config.real_fraction, len(prompts) * generation.top_k, pairs)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if not launching_process():
        weights = model_weights(model, cfg.paths.cache_dir)
        return fit(cfg, prompts, generation, adapter, train_config, out_dir, weights, pairs,
                   generator_weights(cfg, weights))
    with exclusive(out_dir):
        # The weights are found (a hub id downloaded where it is not cached) and hashed before the record is checked.
        weights = model_weights(model, cfg.paths.cache_dir)
        check_schedule(weights.folder, generation)
        generator = generator_weights(cfg, weights)
        record = OmegaConf.to_container(cfg, resolve=True)
        if pairs is not None:  # a resume with another folder of real pairs is another run
            record["real_set"] = pairs.record()
        if generator is not None:
            record["generator_weights"] = generator.record()
        check_config(out_dir, record, resume=bool(cfg.resume), weights=weights.record(),
                     prompts=prompt_record(prompts, prompt_set.source))
        save_hydra_files(cfg, out_dir)  # once the dir has accepted the config
        remove_temporaries(out_dir)
        try:
            return fit(cfg, prompts, generation, adapter, train_config, out_dir, weights, pairs, generator)
        except Preempted as stop:
            command = resume_command(sys.argv[1:], out_dir)
            print(f"mitune: {stop}; newest checkpoint: {stop.checkpoint or latest_checkpoint(RunDir(out_dir).checkpoints)}. "
                  f"Resume with: {command}", file=sys.stderr)
            raise SystemExit(EXIT_STATUS) from None


def generator_weights(cfg: DictConfig, weights: Weights) -> Weights | None:
    """The weights of the model that samples the candidates (``generator``; None: the model being trained), hashed,
    and checked to share the trained model's latent space before either loads."""
    if cfg.get("generator") is None:
        return None
    if train_alone(cfg):
        raise ValueError("generator is set but train.real_fraction=1 generates nothing; set one or the other")
    generator = model_weights(OmegaConf.to_container(cfg.generator, resolve=True), cfg.paths.cache_dir)
    check_latent_space(weights, generator)
    return generator


def train_alone(cfg: DictConfig) -> bool:
    return float(cfg.train.get("real_fraction", 0.0)) == 1


def fit(cfg: DictConfig, prompts: list[str], generation: GenerationConfig, adapter: AdapterConfig,
        train_config: TrainConfig, out_dir: Path, weights: Weights, pairs: Pairs | None = None,
        generator: Weights | None = None) -> float:
    ckpt = resolve_resume(cfg.resume, out_dir)
    base_model = str(cfg.model.path_or_id)
    stop = SigtermStop(RunDir(out_dir).checkpoints)
    rounds = MIRounds(prompts, generation, out_dir, base_model=base_model, stop=stop.check,
                      rounds_from=cfg.get("rounds_from"))
    # The rounds first: a round is generated before the other callbacks' epoch-start hooks (its training bar) run.
    callbacks = [rounds, stop] + [instantiate(spec) for spec in cfg.callbacks.values()]
    # The models first: a start that fails to load one leaves no W&B run behind (mitune.runs.tracking.start_wandb).
    pipe = instantiate(cfg.model, path_or_id=str(weights.folder))  # the weights just hashed, wherever they are
    over_length(pipe.tokenizer, prompts)
    if pairs is not None:  # encoded once with the trained model's VAE, before any training
        check_size(pairs, pipe)
        latents = encode_pairs(pipe, pairs, RunDir(out_dir).external, write=launching_process())
        rounds.real = RealSet(latents, pairs.prompts, train_config.real_fraction, train_config.seed)
    if generator is not None:
        rounds.generator = instantiate(cfg.generator, path_or_id=str(generator.folder))
        # Candidates at the trained model's size (SpRight's SD-2.1 is a 768 px model, SD-2.1-base 512 px).
        rounds.generator.unet.register_to_config(sample_size=pipe.unet.config.sample_size)
    module = MITuneModule(pipe, adapter, train_config)
    loggers = make_loggers(cfg, read_state(ckpt).get("wandb_run_id") if ckpt else None)
    if cfg.resume:  # what was logged after the checkpoint is logged again
        for lg in loggers:
            if isinstance(lg, ResumableCSVLogger):
                lg.resume_from(read_state(ckpt)["global_step"] if ckpt else 0)
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                              plugins=[SafetensorsCheckpointIO(root=out_dir)], precision=precision(cfg.trainer.precision))
        trainer.accumulate_grad_batches = accumulation_steps(
            train_config.effective_batch, train_config.micro_batch, trainer.world_size)
        config = run_config(cfg, accumulate_grad_batches=trainer.accumulate_grad_batches, world_size=trainer.world_size,
                            weights=weights.digest)
        if trainer.is_global_zero:
            start_wandb(loggers)
        for lg in loggers:
            lg.log_hyperparams(config)
        trainer.fit(module, datamodule=FinetuneData(train_config), ckpt_path=ckpt)
    finally:
        finish_wandb()
    if trainer.is_global_zero:
        run = RunDir(out_dir)
        print(f"mitune: {cfg.rounds} round(s) done; adapter in {run.adapter}, "
              f"rounds (images, MI, adapters) in {run.rounds_dir}; outputs in {out_dir}")
    return float(trainer.callback_metrics.get("train/loss", float("nan")))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    with one_line_errors("mitune.run", ModelLoadError, ExternalSetError, LatentSpaceError):
        return train(cfg)


if __name__ == "__main__":
    hydra_task(main, "mitune.run")
