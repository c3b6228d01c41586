"""MI-scored generation rounds between fine-tuning epochs (Algorithm 1's outer loop).

One Lightning epoch is one round's fine-tuning. Round r's set is generated with the
model as it stands after round r-1 (the base model for r=1) when epoch r's data is first
needed, after epoch r-1's checkpoint is written: a kill during a 24-hour round resumes
that round, not the training before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from mitune.adapters import merged_adapters, save_adapters  # noqa: E402
from mitune.data import FinetuneSet, ResumableLoader, load_latents, selected_rows  # noqa: E402
from mitune.generation import (  # noqa: E402
    GenerationConfig,
    RoundSummary,
    finish_round,
    round_settings,
    run_round,
    verify_round,
)
from mitune.io import atomic_write, read_jsonl, write_json  # noqa: E402
from mitune.training import MITuneModule, TrainConfig  # noqa: E402

log = logging.getLogger(__name__)

HISTOGRAM = "mi_hist.png"


class MIRounds(L.Callback):
    """Runs generation rounds with the current model and keeps each round's set and adapter."""

    def __init__(self, prompts: list[str], generation: GenerationConfig, run_dir: str | Path, *, base_model: str,
                 log_images: int = 16, stop: Callable[[], None] | None = None) -> None:
        self.prompts = prompts
        self.generation = generation
        self.run_dir = Path(run_dir)
        self.base_model = base_model
        self.log_images = log_images
        self.stop = stop  # raises between generation batches once a stop (SIGTERM) is requested

    def round_dir(self, r: int) -> Path:
        return self.run_dir / "rounds" / f"round_{r}"

    def ensure_round(self, trainer: L.Trainer, module: MITuneModule, r: int) -> Path:
        """Generate round r unless it is complete; every rank takes a share of the prompts."""
        out = self.round_dir(r)
        # The histogram is written atomically after the round is finished, so it marks a round as
        # complete; a kill before it reruns the (then instant) round, its summary and the plot.
        if (out / HISTOGRAM).is_file():
            if trainer.is_global_zero:  # may rebuild the metadata: one writer
                verify_round(out, round_settings(module.pipe, self.prompts, self.generation), len(self.prompts),
                             self.generation.num_candidates)
            trainer.strategy.barrier("mitune-round-verified")
        else:
            training = module.unet.training
            module.unet.eval()
            with merged_adapters(module.pipe):  # base-model speed; the weights come back bit-exact
                run_round(module.pipe, self.prompts, self.generation, out, progress=trainer.is_global_zero,
                          rank=trainer.global_rank, world_size=trainer.world_size, stop=self.stop)
            module.unet.train(training)
            trainer.strategy.barrier("mitune-round")
            if trainer.is_global_zero:
                self.log_round(trainer, r, finish_round(out, len(self.prompts)))
            trainer.strategy.barrier("mitune-round-done")
        return out

    def log_round(self, trainer: L.Trainer, r: int, summary: RoundSummary) -> None:
        """Per-round MI statistics, an MI histogram and an image table."""
        out = summary.round_dir
        rows = read_jsonl(out / "metadata.jsonl")
        mi = torch.tensor([row["mi"] for row in rows])
        chosen = torch.tensor([row["selected"] for row in rows])
        stats = {
            "round/index": r,
            "round/mean_mi": summary.mean_mi,
            "round/median_mi": summary.median_mi,
            "round/topk_mi": summary.mean_selected_mi,
            "round/selection_margin": summary.selection_margin,
        }
        figure = plot_mi(mi, chosen, r)
        atomic_write(out / HISTOGRAM, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
        plt.close(figure)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_image("round/mi_hist", [str(out / HISTOGRAM)], step=trainer.global_step)
                logger.log_table(
                    "round/images",
                    columns=["round", "prompt", "image", "mi", "rank", "selected"],
                    data=[[r, row["prompt"], wandb_image(out / row["file_name"]), row["mi"], row["rank"], row["selected"]]
                          for row in rows[: self.log_images]],
                    step=trainer.global_step,
                )
        log.info("round %d: %s", r, {k: round(v, 4) for k, v in stats.items()})

    def on_train_epoch_end(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """Keep the adapter of the round just trained (and the latest one as the run's result)."""
        if trainer.is_global_zero:
            r = trainer.current_epoch + 1
            for target in (self.round_dir(r) / "adapter", self.run_dir / "adapter"):
                save_adapters(module.pipe, target, base_model=self.base_model, config=module.adapter_config)
            write_json(self.run_dir / "rounds" / "progress.json", {"rounds_trained": r, "global_step": trainer.global_step})


class StepCheckpoint(ModelCheckpoint):
    """Mid-round checkpoints every N optimizer steps, taken only right after a step.

    Lightning would also save between the micro-batches of an accumulated step (losing the
    gradients gathered so far) and on an epoch's last batch before the epoch has ended
    (from which it cannot resume); the round-end checkpoint covers the latter.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done % trainer.accumulate_grad_batches == 0 and done < trainer.num_training_batches:
            super().on_train_batch_end(trainer, *args, **kwargs)


def samples_per_second(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's throughput monitor (train/device/samples_per_sec), counting latents per batch."""
    return ThroughputMonitor(batch_size_fn=lambda batch: batch["latents"].shape[0], window_size=window_size)


def wandb_image(path: Path):
    import wandb

    return wandb.Image(str(path))


def plot_mi(mi: torch.Tensor, chosen: torch.Tensor, r: int) -> plt.Figure:
    figure, ax = plt.subplots(figsize=(5, 3))
    bins = torch.linspace(mi.min().item(), mi.max().item(), 30).tolist() if len(mi) > 1 else 10
    ax.hist(mi[~chosen].tolist(), bins=bins, alpha=0.6, label="not selected")
    ax.hist(mi[chosen].tolist(), bins=bins, alpha=0.8, label="selected (top-k)")
    ax.set(xlabel="point-wise MI (nats)", ylabel="candidates", title=f"round {r}")
    ax.legend()
    figure.tight_layout()
    return figure


class FinetuneData(L.LightningDataModule):
    """Serves the current round's set; a resumed epoch continues after its last completed batch."""

    def __init__(self, rounds: MIRounds, train: TrainConfig) -> None:
        super().__init__()
        self.rounds = rounds
        self.train = train

    def train_dataloader(self):
        trainer, module = self.trainer, self.trainer.lightning_module
        r = epoch_index(trainer) + 1
        out = self.rounds.ensure_round(trainer, module, r)
        rows = selected_rows(out)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
        position = {p: i for i, p in enumerate(prompts)}
        module.set_prompts(prompts)
        dataset = FinetuneSet(
            load_latents(out, rows),
            torch.tensor([position[row["prompt"]] for row in rows]),
            self.train.steps_per_round * self.train.effective_batch,
            seed=self.train.seed,
            round_index=r,
            t_range=(self.train.t_min, self.train.t_max),
        )
        return ResumableLoader(dataset, self.train.micro_batch, trainer.global_rank, trainer.world_size,
                               lambda: (epoch_index(trainer), trainer.fit_loop.epoch_loop.batch_progress.current.processed))


def epoch_index(trainer: L.Trainer) -> int:
    """The epoch being trained, also while a checkpoint is being restored.

    ``trainer.current_epoch`` lags by one there when the checkpoint was written at the end
    of an epoch; the count of fully processed epochs does not.
    """
    return trainer.fit_loop.epoch_progress.current.processed
