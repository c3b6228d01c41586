"""DoRA fine-tuning of the UNet on a round's MI-selected images (Algorithm 1, line 5).

The LightningModule trains only adapter weights with the epsilon-prediction loss at
t ~ U(t_min, t_max) on cached latents and text embeddings, so neither the VAE nor (by
default) the text encoder runs in the training step.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from lightning.pytorch.loggers import WandbLogger

from mitune.mi.estimators import Embedding
from mitune.mi.pipeline import (
    ddpm_scheduler,
    encode_prompts,
    index_embedding,
    is_sdxl,
    null_embedding,
    replace_rows,
    unet_eps_fn,
)
from mitune.models.adapters import AdapterConfig, DoraNormCache, add_adapters
from mitune.rounds.data import EMPTY_PROMPT
from mitune.rounds.settings import TrainConfig
from mitune.runs.checkpoints import newest_finite, progress_key

MICRO_BATCH = "mitune_micro_batch"  # the checkpoint key of the train.micro_batch its batch counts are in


def accumulation_steps(effective_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Gradient-accumulation steps that reach the effective batch exactly, or a clear error."""
    per_step = micro_batch * world_size
    if effective_batch % per_step:
        raise ValueError(
            f"effective batch {effective_batch} is not reachable with micro_batch {micro_batch} x {world_size} "
            f"device(s) = {per_step} per accumulation step; choose micro_batch so that micro_batch x devices "
            f"divides {effective_batch}"
        )
    return effective_batch // per_step


class MITuneModule(L.LightningModule):
    """The pipeline's UNet (and optionally its text encoder) with trainable adapters."""

    # Not counted (benchmarks/ measure MFU): Lightning's ThroughputMonitor then logs samples/s alone.
    flops_per_batch = None

    def __init__(self, pipe: DiffusionPipeline, adapter: AdapterConfig, train: TrainConfig) -> None:
        super().__init__()
        if train.t_max > pipe.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"train.t_max={train.t_max} exceeds the model's {pipe.scheduler.config.num_train_timesteps} timesteps"
            )
        if train.train_text_encoder and is_sdxl(pipe):
            raise ValueError("train.train_text_encoder is supported for SD 1.x/2.x pipelines, not SDXL")
        self.pipe = pipe
        self.adapter_config = adapter
        self.train_config = train
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder if train.train_text_encoder else None
        with torch.random.fork_rng(devices=[]):  # adapter init (lora_A) reproducible from the seed alone
            torch.manual_seed(train.seed)
            self.trainable = add_adapters(pipe, adapter, text_encoder=train.train_text_encoder)
        # train.restart: each round's training starts from these values (kept on the host, off the accelerator).
        self.initial = [p.detach().cpu().clone() for p in self.trainable] if train.restart else None
        self.norm_cache: DoraNormCache | None = None
        if train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = ddpm_scheduler(pipe)
        self.eps_fn = unet_eps_fn(pipe)
        self.prompts: list[str] = []
        self.embeddings: Embedding | None = None
        self.null: Embedding | None = None
        # Checkpoints hold adapter weights only; the frozen base comes from the model path.
        self.strict_loading = False

    def set_prompts(self, prompts: list[str]) -> None:
        """The round's prompts; their embeddings are computed once when the encoder is frozen."""
        self.prompts = prompts
        self.embeddings = None if self.text_encoder is not None else encode_prompts(self.pipe, prompts)
        # The unconditional embedding exactly as CFG uses it (SDXL's zeros included), for EMPTY_PROMPT samples.
        self.null = None if self.text_encoder is not None else null_embedding(self.pipe)

    def prompt_embedding(self, index: torch.Tensor) -> Embedding:
        index = index.to(self.device)
        if self.text_encoder is None:
            # A select, not a branch on `.any()`: no host sync per step on an accelerator.
            return replace_rows(index_embedding(self.embeddings, index.clamp(min=0)), index == EMPTY_PROMPT, self.null)
        tokens = self.pipe.tokenizer(
            ["" if i == EMPTY_PROMPT else self.prompts[i] for i in index.tolist()], padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z0, noise, t = batch["latents"], batch["noise"], batch["t"]
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        pred = self.eps_fn(z_t, t, self.prompt_embedding(batch["prompt"]))
        loss = F.mse_loss(pred.float(), noise.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at global step {self.global_step}; stopping. "
                f"Newest finite checkpoint: {self.newest_checkpoint()}. "
                "Lower train.lr or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        self.log("train/t_mean", t.float().mean(), batch_size=z0.shape[0])
        return loss

    def newest_checkpoint(self) -> str:
        folders = {c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        found = [p for p in map(newest_finite, folders) if p is not None]
        return str(max(found, key=progress_key)) if found else "none yet"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Not Lightning's grad_norm: the same total bit for bit, but it builds a per-tensor dict and copies
        # each tensor's norm to the host one by one (10x slower than this foreach norm on the tiny model).
        grads = [p.grad for p in self.trainable if p.grad is not None]
        self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.train_config
        optimizer = torch.optim.AdamW(self.trainable, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, eps=c.eps)
        if c.cache_dora_norm:
            self.norm_cache = DoraNormCache([m for m in (self.unet, self.text_encoder) if m is not None], optimizer)
        return optimizer

    def restart(self) -> None:
        """``train.restart``: the adapters back at their initial values (DoRA's magnitudes included), without
        gradients, and AdamW's state dropped, so the round trains as a fresh module with a fresh optimizer would:
        AdamW re-creates each parameter's moments and step count at its next step, the learning rate is constant
        and no scheduler counts steps."""
        if self.initial is None:
            raise RuntimeError("restart needs the initial adapter values, kept only with train.restart=true")
        with torch.no_grad():
            for param, value in zip(self.trainable, self.initial):
                param.copy_(value)
                param.grad = None
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        if self.norm_cache is not None:
            self.norm_cache.values.clear()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the W&B run id so that a resumed run continues the same W&B run, and the micro-batch the
        checkpoint's batch counts are in."""
        checkpoint[MICRO_BATCH] = self.train_config.micro_batch
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume may lower (or raise) train.micro_batch, e.g. after an out-of-memory error: the checkpoint's
        counts of the round's micro-batches are converted to the new size before Lightning restores them (a
        checkpoint is taken after whole optimizer steps, so the samples done are a multiple of both)."""
        fit = checkpoint["loops"]["fit_loop"]
        old, new = checkpoint.get(MICRO_BATCH) or self.micro_batch_of(fit), self.train_config.micro_batch
        if old is None or old == new:
            return
        for progress in (fit["epoch_loop.batch_progress"]["total"], fit["epoch_loop.batch_progress"]["current"]):
            processed = progress["processed"]
            rescaled = processed * old // new
            for key in progress:  # counters that lag "processed" (completed) keep their lag
                progress[key] = rescaled - (processed - progress[key])
        for loader in fit["state_dict"].get("combined_loader", []):
            loader["processed"] = loader["processed"] * old // new
        checkpoint[MICRO_BATCH] = new

    def micro_batch_of(self, fit: dict) -> int | None:
        """The micro-batch of a checkpoint written before mitune recorded it, from the round's optimizer steps and
        micro-batches so far (None at a round's start, where there is nothing to convert)."""
        steps = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["current"]["completed"]
        batches = fit["epoch_loop.batch_progress"]["current"]["processed"]
        if not steps or not batches:
            return None
        return self.train_config.effective_batch * steps // (batches * self.trainer.world_size)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only the trainable (adapter) weights: checkpoints stay small and base-agnostic."""
        full = super().state_dict(*args, **kwargs)
        names = {id(p) for p in self.trainable}
        keep = {name for name, p in self.named_parameters() if id(p) in names}
        return {k: v for k, v in full.items() if k in keep}
