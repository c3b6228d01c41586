"""SIGTERM, which SLURM and most schedulers send before a kill: stop at the next safe point.

Lightning's own handler stops after the current micro-batch, mid-way through an accumulated
optimizer step, where no checkpoint can be resumed exactly, and exits with status 0. Here the
signal only sets a flag; training continues to the end of the optimizer step, writes a
checkpoint and stops; a generation round stops between micro-batches (its finished prompts
are already on disk). The task then prints how to resume and exits with 128 + SIGTERM (143),
the status a scheduler's requeue logic expects of a terminated job.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """Raised at the safe point after SIGTERM; ``checkpoint`` is what a resume continues from."""

    def __init__(self, where: str, checkpoint: Path | None = None) -> None:
        super().__init__(f"stopped by SIGTERM {where}")
        self.checkpoint = checkpoint


class SigtermStop(L.Callback):
    """Turns SIGTERM into a stop at the next safe point (single-process runs; DDP keeps Lightning's)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested = False

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # Lightning then installs its own handler, calling this one too, before round 1 is generated.
        if trainer.world_size == 1:
            signal.signal(signal.SIGTERM, self.request)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """From here on, only this handler: Lightning's would stop in the middle of an optimizer step."""
        if trainer.world_size > 1:
            return
        if self.requested or trainer.received_sigterm:
            raise Preempted("after generating round 1")
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum: int, frame: object) -> None:
        if not self.requested:
            log.warning("SIGTERM received: stopping at the next safe point")
        self.requested = True

    def check(self) -> None:
        """Called between generation micro-batches."""
        if self.requested:
            raise Preempted("during a generation round (finished prompts are kept)")

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        step_done = done % trainer.accumulate_grad_batches == 0
        # A round's last batch is left to the round-end checkpoint; the next round's generation stops.
        if self.requested and step_done and done < trainer.num_training_batches:
            path = self.checkpoint_dir / f"sigterm-step-{trainer.global_step:06d}.ckpt"
            trainer.save_checkpoint(path)
            raise Preempted(f"after optimizer step {trainer.global_step}", path)
