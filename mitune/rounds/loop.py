"""Algorithm 1, R times: generate, score, select, fine-tune, as one Lightning epoch per round.

    for r in 1..R:                                     (epoch r)
        round_dir = generate_round(model, prompts)     M candidates per prompt, each with its MI (Algorithm 2)
        select_round(round_dir)                        the top-k of each prompt by the strategy's score
        fine-tune on RoundSet.from_round(r, round_dir) steps_per_round optimizer steps of the adapters
        save the adapter after round r

With ``train.restart`` (not the paper's; issue 31), the fine-tuning line becomes: reset the adapter to its initial
values and AdamW's state, then fine-tune on the union of rounds 1..r's sets.

``MIRounds`` (a Lightning callback) runs the first two lines when epoch r starts, with the model as it
stands after round r-1 (the base model for r=1) and after epoch r-1's checkpoint is written (a kill during
a 24-hour round resumes that round, not the training before it). It then hands the round's set to the
data module and the round's prompts to the module: the hand-off is ``RoundSet``. Lightning sized the
epoch before the round existed, since ``FinetuneSet`` has a fixed length.

Two variants of the paper's: real image-prompt pairs in the set (``RealSet``: mixed with the selected images at
``train.real_fraction``, or alone, when no round is generated), and candidates from another model (``generator``:
Table 1's SpRight candidates for SD-2.1-base, Algorithm 2's MI under that model), while the adapters train on the
model being aligned.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
from diffusers import DiffusionPipeline
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure

from mitune.models.adapters import merged_adapters, save_adapters
from mitune.rounds.data import FinetuneData, RoundSet, epoch_index
from mitune.rounds.external import RealSet
from mitune.rounds.generation import check_settings, compared, generate_round, round_settings
from mitune.rounds.module import MITuneModule
from mitune.rounds.plots import describe, plot_round
from mitune.rounds.selection import check_strategy, sampling_scores, select_round, verify_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RoundDir, RunDir, finished
from mitune.runs.io import atomic_dir, save_figure, write_json

# Generation settings that decide which candidates a round keeps, not which it generates (``rounds_from`` ranks
# another run's round-1 candidates again where only these differ).
SELECTION = ("selection", "top_k")

log = logging.getLogger(__name__)


class MIRounds(L.Callback):
    """Runs generation rounds with the current model and keeps each round's set and adapter."""

    def __init__(self, prompts: list[str], generation: GenerationConfig, run_dir: str | Path, *, base_model: str,
                 log_images: int = 16, stop: Callable[[], None] | None = None, real: RealSet | None = None,
                 generator: DiffusionPipeline | None = None, rounds_from: str | Path | None = None) -> None:
        self.prompts = prompts
        self.real = real  # real pairs in each round's set (train.real_fraction)
        self.generator = generator  # the model that samples the candidates; None: the model being trained
        self.rounds_from = RunDir(Path(rounds_from)) if rounds_from is not None else None
        self.generation = generation
        self.run = RunDir(Path(run_dir))
        self.base_model = base_model
        self.log_images = log_images
        self.stop = stop  # raises between generation batches once a stop (SIGTERM) is requested

    def on_train_start(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """The round being trained; also here because a run resumed mid-round gets no epoch start. A resumed run
        first checks the rounds it finished before: they are part of its result (each round's image folder)."""
        if trainer.is_global_zero:
            settings = round_settings(module.pipe, self.prompts, self.generation)
            for r in range(1, epoch_index(trainer) + 1):
                verify_round(self.run.round(r), settings, len(self.prompts), self.generation)
        trainer.strategy.barrier("mitune-earlier-rounds-verified")
        self.start_round(trainer, module)

    def on_train_epoch_start(self, trainer: L.Trainer, module: MITuneModule) -> None:
        self.start_round(trainer, module)

    def start_round(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """Generate and select the epoch's round (or reuse it), then hand its set to the data and the module."""
        data = trainer.datamodule
        if not isinstance(data, FinetuneData):
            raise TypeError(f"MIRounds trains on a FinetuneData data module, got {type(data).__name__}")
        r = epoch_index(trainer) + 1
        if data.dataset.round_index == r:
            return
        if self.real is not None and self.real.fraction == 1:
            round_set = self.real.alone(r)
        else:
            round_set = RoundSet.from_round(r, self.ensure_round(trainer, module, r))
            if self.real is not None:
                round_set = self.real.mix(round_set)
        if module.train_config.restart:
            round_set = self.restart(trainer, module, r, round_set)
        module.set_prompts(round_set.prompts)
        data.dataset.load(round_set)

    def restart(self, trainer: L.Trainer, module: MITuneModule, r: int, round_set: RoundSet) -> RoundSet:
        """``train.restart``: round r's set is the union of rounds 1..r's (the earlier rounds are complete: made
        before, and checked on a resume), and a round that starts training (not one resumed after some of its steps)
        starts from the initial adapter and a fresh optimizer, after round r-1's model generated its candidates."""
        earlier = [RoundSet.from_round(i, self.run.round(i)) for i in range(1, r)]
        union = RoundSet.union(r, [*earlier, round_set])
        if r > 1 and trainer.global_step == (r - 1) * module.train_config.steps_per_round:
            module.restart()
            if trainer.is_global_zero:
                log.info("round %d: a fresh adapter trains on the %d selected images of rounds 1-%d (train.restart)",
                         r, len(union.latents), r)
        return union

    def ensure_round(self, trainer: L.Trainer, module: MITuneModule, r: int) -> RoundDir:
        """Generate and select round r unless it is complete; every rank generates a share of the prompts,
        rank 0 selects."""
        out = self.run.round(r)
        pipe = self.generator or module.pipe
        if self.rounds_from is not None and r == 1 and trainer.is_global_zero and not out.path.exists():
            self.take_round(self.rounds_from.round(r), out, round_settings(pipe, self.prompts, self.generation))
        trainer.strategy.barrier("mitune-round-taken")
        if out.is_complete():
            if trainer.is_global_zero:  # may rebuild the metadata and the plot: one writer
                verify_round(out, round_settings(pipe, self.prompts, self.generation), len(self.prompts),
                             self.generation)
                if not out.histogram.is_file():  # killed between the round's end and its plot
                    save_figure(out.histogram, self.histogram(out.rows(), r), dpi=100)
            trainer.strategy.barrier("mitune-round-verified")
            return out
        training = module.unet.training
        module.unet.eval()
        with merged_adapters(module.pipe):  # base-model speed; the weights come back bit-exact
            generate_round(pipe, self.prompts, self.generation, out, scores=sampling_scores(self.generation.selection),
                           progress=trainer.is_global_zero, rank=trainer.global_rank, world_size=trainer.world_size,
                           stop=self.stop)
            trainer.strategy.barrier("mitune-round")
            if trainer.is_global_zero:  # every rank's prompts are in; a model-scored strategy scores under pipe
                stats = select_round(out, len(self.prompts), self.generation, pipe)
        module.unet.train(training)
        if trainer.is_global_zero:
            self.log_round(trainer, r, out, stats)
        trainer.strategy.barrier("mitune-round-done")
        return out

    def take_round(self, source: RoundDir, out: RoundDir, settings: dict) -> None:
        """Another run's finished round 1 as this run's (``rounds_from``): the same candidates, generated once.

        Round 1 only: its candidates come from the base model (an adapter at its init changes no weight), while a
        later round's come from the adapter that run trained. Where the settings (model, prompts, generation) are
        this round's, the round is copied whole (the same picks); where they differ only in the selection
        (``SELECTION``), its candidates are copied and ranked again by this run's selection, unless that needs a
        score the source did not compute while sampling. Nothing of the other run is written; the round is then
        checked, or selected, as any round is."""
        if not source.is_complete():
            return
        try:
            check_settings(source, settings)
        except ValueError:  # another round's settings: refused below, naming them, unless only selection differs
            if not self.same_candidates(source, settings):
                raise
            with atomic_dir(out.path, source.summary_file.name) as tmp:
                for name in RoundDir.CONTENT_DIRS:
                    if (source.path / name).is_dir():
                        shutil.copytree(source.path / name, tmp / name, ignore=shutil.ignore_patterns(".*"))
                write_json(RoundDir(tmp).settings_file, settings)
            return
        with atomic_dir(out.path, source.summary_file.name) as tmp:
            shutil.copytree(source.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("adapter", ".*"))

    def same_candidates(self, source: RoundDir, settings: dict) -> bool:
        """Whether ``source`` generated the candidates this round would, with every score this selection ranks by."""
        theirs = json.loads(source.settings_file.read_text(encoding="utf-8"))
        drop = lambda s: {**s, "generation": {k: v for k, v in s["generation"].items() if k not in SELECTION}}  # noqa: E731
        computed = set(sampling_scores(theirs["generation"].get("selection", "mi")))
        return drop(compared(theirs)) == drop(compared(settings)) and set(sampling_scores(self.generation.selection)) <= computed

    def on_train_epoch_end(self, trainer: L.Trainer, module: MITuneModule) -> None:
        """Keep the adapter of the round just trained (and the latest one as the run's result)."""
        if trainer.is_global_zero:
            r = trainer.current_epoch + 1
            for target in (self.run.round(r).adapter, self.run.adapter):
                save_adapters(module.pipe, target, base_model=self.base_model, config=module.adapter_config)
            self.run.write_progress(r, trainer.global_step)

    def log_round(self, trainer: L.Trainer, r: int, out: RoundDir, stats: dict[str, float]) -> None:
        """Per-round MI statistics, an MI histogram and an image table."""
        rows = out.rows()
        logged = {"round/index": r, "round/mean_mi": stats["mean_mi"], "round/median_mi": stats["median_mi"],
                  "round/topk_mi": stats["mean_selected_mi"], "round/selection_margin": stats["selection_margin"]}
        save_figure(out.histogram, self.histogram(rows, r), dpi=100)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_image("round/mi_hist", [str(out.histogram)], step=trainer.global_step)
                logger.log_table(
                    "round/images",
                    columns=["round", "prompt", "image", "mi", "rank", "selected"],
                    data=[[r, row["prompt"], wandb_image(out.path / row["file_name"]), row["mi"], row["rank"],
                           row["selected"]] for row in finished(rows)[: self.log_images]],
                    step=trainer.global_step,
                )

    def histogram(self, rows: list[dict], r: int) -> Figure:
        return plot_round(rows, f"round {r}: {describe(self.generation)}")


def wandb_image(path: Path):
    import wandb

    return wandb.Image(str(path))


def run_round(pipe: DiffusionPipeline, prompts: list[str], config: GenerationConfig, round_dir: RoundDir | str | Path,
              **kwargs) -> RoundDir:
    """One round's data in one process, as ``MIRounds`` makes it: generate and score, then select. A strategy
    that cannot rank these prompts fails before any sampling."""
    check_strategy(config.selection, prompts)
    out = generate_round(pipe, prompts, config, round_dir, scores=sampling_scores(config.selection), **kwargs)
    select_round(out, len(prompts), config, pipe)
    return out
