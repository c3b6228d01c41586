"""MI-scored generation rounds between fine-tuning epochs (Algorithm 1's outer loop).

One Lightning epoch is one round's fine-tuning. The ``MIRounds`` callback generates round r's
set with the model as it stands after round r-1 (the base model for r=1) when epoch r starts,
after epoch r-1's checkpoint is written (a kill during a 24-hour round resumes that round, not
the training before it), and loads it into ``FinetuneData``'s set, which Lightning sized
before the round existed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mitune.adapters import merged_adapters, save_adapters
from mitune.artifacts import RoundDir, RunDir
from mitune.data import FinetuneSet, ResumableLoader
from mitune.generation import GenerationConfig, RoundSummary, finish_round, round_settings, run_round, verify_round
from mitune.io import save_figure
from mitune.training import MITuneModule, TrainConfig

log = logging.getLogger(__name__)


class MIRounds(L.Callback):
    """Runs generation rounds with the current model and keeps each round's set and adapter."""

    def __init__(self, prompts: list[str], generation: GenerationConfig, run_dir: str | Path, *, base_model: str,
                 log_images: int = 16, stop: Callable[[], None] | None = None) -> None:
        self.prompts = prompts
        self.generation = generation
        self.run = RunDir(Path(run_dir))
        self.base_model = base_model
        self.log_images = log_images
        self.stop = stop  # raises between generation batches once a stop (SIGTERM) is requested

    def on_train_start(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """The round being trained; also here because a run resumed mid-round gets no epoch start."""
        self.load_round(trainer, module)

    def on_train_epoch_start(self, trainer: L.Trainer, module: MITuneModule) -> None:
        self.load_round(trainer, module)

    def load_round(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """Generate (or reuse) the epoch's round and hand its selected set to the data module."""
        data = trainer.datamodule
        if not isinstance(data, FinetuneData):
            raise TypeError(f"MIRounds trains on a FinetuneData data module, got {type(data).__name__}")
        r = epoch_index(trainer) + 1
        if data.dataset.round_index == r:
            return
        round_dir = self.ensure_round(trainer, module, r)
        rows = round_dir.selected_rows()
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
        position = {p: i for i, p in enumerate(prompts)}
        module.set_prompts(prompts)
        data.dataset.load(r, round_dir.latents(rows), torch.tensor([position[row["prompt"]] for row in rows]))

    def ensure_round(self, trainer: L.Trainer, module: MITuneModule, r: int) -> RoundDir:
        """Generate round r unless it is complete; every rank takes a share of the prompts."""
        out = self.run.round(r)
        if out.is_complete():
            if trainer.is_global_zero:  # may rebuild the metadata and the plot: one writer
                verify_round(out, round_settings(module.pipe, self.prompts, self.generation), len(self.prompts),
                             self.generation.num_candidates)
                if not out.histogram.is_file():  # killed between the round's end and its plot
                    save_figure(out.histogram, self.histogram(out.rows(), r), dpi=100)
            trainer.strategy.barrier("mitune-round-verified")
        else:
            training = module.unet.training
            module.unet.eval()
            with merged_adapters(module.pipe):  # base-model speed; the weights come back bit-exact
                summary = run_round(module.pipe, self.prompts, self.generation, out, progress=trainer.is_global_zero,
                                    rank=trainer.global_rank, world_size=trainer.world_size, stop=self.stop)
            module.unet.train(training)
            trainer.strategy.barrier("mitune-round")
            if trainer.is_global_zero:  # one process: run_round has finished the round; DDP: all ranks' parts are in
                self.log_round(trainer, r, summary or finish_round(out, len(self.prompts)))
            trainer.strategy.barrier("mitune-round-done")
        return out

    def log_round(self, trainer: L.Trainer, r: int, summary: RoundSummary) -> None:
        """Per-round MI statistics, an MI histogram and an image table."""
        out = RoundDir(summary.round_dir)
        rows = out.rows()
        stats = {
            "round/index": r,
            "round/mean_mi": summary.mean_mi,
            "round/median_mi": summary.median_mi,
            "round/topk_mi": summary.mean_selected_mi,
            "round/selection_margin": summary.selection_margin,
        }
        save_figure(out.histogram, self.histogram(rows, r), dpi=100)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_image("round/mi_hist", [str(out.histogram)], step=trainer.global_step)
                logger.log_table(
                    "round/images",
                    columns=["round", "prompt", "image", "mi", "rank", "selected"],
                    data=[[r, row["prompt"], wandb_image(out.path / row["file_name"]), row["mi"], row["rank"],
                           row["selected"]] for row in rows[: self.log_images]],
                    step=trainer.global_step,
                )

    def histogram(self, rows: list[dict], r: int) -> Figure:
        mi = torch.tensor([row["mi"] for row in rows])
        chosen = torch.tensor([row["selected"] for row in rows])
        prompt_ids = torch.tensor([row["prompt_id"] for row in rows])
        return plot_mi(mi, prompt_ids, chosen, f"round {r}: {describe(self.generation)}")

    def on_train_epoch_end(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """Keep the adapter of the round just trained (and the latest one as the run's result)."""
        if trainer.is_global_zero:
            r = trainer.current_epoch + 1
            for target in (self.run.round(r).adapter, self.run.adapter):
                save_adapters(module.pipe, target, base_model=self.base_model, config=module.adapter_config)
            self.run.write_progress(r, trainer.global_step)


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


class RoundProgressBar(TQDMProgressBar):
    """Lightning's training bar, one per round (an epoch is a round) and named by it, without the logger version.

    Each round's bar is made when the round's training starts, after its generation bar has closed, and
    closed when it ends.
    """

    def __init__(self, images_per_batch: int = 1) -> None:
        super().__init__(leave=True)
        self.images_per_batch = images_per_batch
        self.bar_round = -1

    @property
    def train_description(self) -> str:
        return f"round_{self.trainer.current_epoch + 1} train"

    def init_train_tqdm(self):
        """Counted in images, as the generation bar is."""
        bar = super().init_train_tqdm()
        bar.unit, bar.unit_scale = "img", self.images_per_batch
        return bar

    def on_train_start(self, trainer: L.Trainer, *_) -> None:
        """The bar of the round about to train; made here too, as a run resumed mid-round gets no epoch start."""
        self.round_bar(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        if self.bar_round != trainer.current_epoch:
            self.round_bar(trainer)

    def round_bar(self, trainer: L.Trainer) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.bar_round = trainer.current_epoch

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return metrics


class LearningRate(L.Callback):
    """``train/lr`` at every optimizer step (Lightning's LearningRateMonitor names it after the optimizer class)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        module.log("train/lr", optimizer.param_groups[0]["lr"])


class DeviceStats(L.Callback):
    """Memory (and CPU load) once per optimizer step under ``device/``.

    Lightning's DeviceStatsMonitor logs every statistic the accelerator has (dozens on a GPU) before
    and after every batch; W&B records the machine's metrics itself, so the loggers get only these.
    """

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            module.log_dict(device_stats(trainer.accelerator.get_device_stats(module.device)))


# Accelerator statistic -> (logged name, scale): CUDA's torch.cuda.memory_stats, the CPU's psutil figures.
DEVICE_STATS = {
    "allocated_bytes.all.current": ("device/memory_gb", 1e-9),
    "allocated_bytes.all.peak": ("device/peak_memory_gb", 1e-9),
    "cpu_percent": ("device/cpu_percent", 1.0),
    "cpu_vm_percent": ("device/ram_percent", 1.0),
}


def device_stats(stats: dict[str, float]) -> dict[str, float]:
    """The figures worth a plot out of an accelerator's statistics."""
    return {name: float(stats[key]) * scale for key, (name, scale) in DEVICE_STATS.items() if key in stats}


def wandb_image(path: Path):
    import wandb

    return wandb.Image(str(path))


def describe(generation: GenerationConfig) -> str:
    return f"M={generation.num_candidates}, k={generation.top_k}, CFG {generation.guidance_scale:g}"


def per_prompt_z(mi: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """MI relative to the other candidates of its prompt: (MI - prompt mean) / prompt std (0 where constant).

    Selection is per prompt, and MI levels differ between prompts, so pooled raw MI would show
    selected images below unselected ones of other prompts.
    """
    z = torch.zeros(len(mi), dtype=torch.float64)
    for pid in prompt_ids.unique():
        mine = prompt_ids == pid
        values = mi[mine].double()
        std = values.std() if len(values) > 1 else torch.tensor(0.0)
        z[mine] = (values - values.mean()) / std if std > 0 else 0.0
    return z


def plot_mi(mi: torch.Tensor, prompt_ids: torch.Tensor, chosen: torch.Tensor, title: str) -> Figure:
    """Left: MI relative to each prompt, selected vs not; right: raw MI per prompt, selected highlighted."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    relative, raw = figure.subplots(1, 2)
    z = per_prompt_z(mi, prompt_ids)
    bins = torch.linspace(z.min().item(), z.max().item(), 30).tolist() if z.max() > z.min() else 10
    relative.hist(z[~chosen].tolist(), bins=bins, alpha=0.6, label="not selected")
    relative.hist(z[chosen].tolist(), bins=bins, alpha=0.8, label="selected (top-k)")
    relative.set(xlabel="MI relative to its prompt (z-score)", ylabel="candidates")
    relative.legend(fontsize=8)
    raw.scatter(prompt_ids[~chosen].tolist(), mi[~chosen].tolist(), s=6, color="0.6", label="not selected")
    raw.scatter(prompt_ids[chosen].tolist(), mi[chosen].tolist(), s=14, color="C1", label="selected (top-k)")
    raw.set(xlabel="prompt", ylabel="point-wise MI (nats)")
    raw.xaxis.set_major_locator(MaxNLocator(integer=True))
    raw.legend(fontsize=8)
    figure.suptitle(title)
    return figure


class FinetuneData(L.LightningDataModule):
    """Serves the current round's set (loaded by ``MIRounds``); a resumed epoch continues after its
    last completed batch."""

    def __init__(self, train: TrainConfig) -> None:
        super().__init__()
        self.train = train
        self.dataset = FinetuneSet(train.steps_per_round * train.effective_batch, seed=train.seed,
                                   t_range=(train.t_min, train.t_max), empty_prompt_prob=train.empty_prompt_prob)

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        return ResumableLoader(self.dataset, self.train.micro_batch, trainer.global_rank, trainer.world_size,
                               lambda: (epoch_index(trainer), trainer.fit_loop.epoch_loop.batch_progress.current.processed))


def epoch_index(trainer: L.Trainer) -> int:
    """The epoch being trained, also while a checkpoint is being restored.

    ``trainer.current_epoch`` lags by one there when the checkpoint was written at the end
    of an epoch; the count of fully processed epochs does not.
    """
    return trainer.fit_loop.epoch_progress.current.processed
