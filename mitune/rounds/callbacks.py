"""The training loop's generic callbacks: step checkpoints, the per-round progress bar, learning rate,
throughput and device statistics (``conf/callbacks/default.yaml``)."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import (
    ModelCheckpoint,
    ThroughputMonitor,
    TQDMProgressBar,
)
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf


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


class RoundCheckpoint(ModelCheckpoint):
    """The end-of-round checkpoint, named by the round it ends (``round-001.ckpt`` after round 1): Lightning's
    ``{epoch}`` counts from 0 and its default name holds an ``=``, which shells and Hydra overrides need quoted.
    ``{round}`` in ``filename`` is the 1-based round; older run dirs' ``round-epoch=0.ckpt`` still resume (a
    checkpoint is found by its state, not its name)."""

    def format_checkpoint_name(self, metrics: dict, filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        epoch = metrics.get("epoch")
        metrics = {**metrics, "round": (int(epoch) if epoch is not None else 0) + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)


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

    def init_train_tqdm(self) -> Tqdm:
        """Counted in images, as the generation bar is, and made with its total: a bar made without one
        shows a ``0/?`` state first (Lightning's own, then reset)."""
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    total=convert_inf(self.total_train_batches), unit="img", unit_scale=self.images_per_batch)

    def on_train_start(self, *_) -> None:
        """No bar yet: round 1's candidates are generated at its epoch start, and a bar made now would stay on
        the console as an empty ``round_1 train: 0/?`` above the generation bar."""

    def on_train_epoch_start(self, *_) -> None:
        """The bar is made at the round's first batch (``on_train_batch_start``), once its data exists."""

    def on_train_batch_start(self, trainer: L.Trainer, *_) -> None:
        """The round's bar, at its first batch (also the first batch after a resume mid-round)."""
        if self.bar_round != trainer.current_epoch:
            self.round_bar(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.bar_round == trainer.current_epoch:
            super().on_train_epoch_end(trainer, module)

    def on_train_end(self, *_) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    def round_bar(self, trainer: L.Trainer) -> None:
        self.train_progress_bar = self.init_train_tqdm()
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
