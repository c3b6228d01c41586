"""The fine-tuning set of a round, served as a fixed number of optimizer steps.

Every sample's (t, noise) is drawn from a generator keyed by (seed, round, sample index),
and the order of samples is a seeded function of the index. So the gradient of a step does
not depend on how the effective batch is split into micro-batches, accumulation and
devices, and a resumed run sees exactly the samples it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mitune.rounds.settings import TrainConfig
from mitune.runs.artifacts import RoundDir
from mitune.runs.seeds import mix_seed

EMPTY_PROMPT = -1
"""The prompt index of a sample trained on the empty prompt (``FinetuneSet``'s ``empty_prompt_prob``)."""


@dataclass(frozen=True)
class RoundSet:
    """What a round hands to its fine-tuning: the selected latents, the round's prompts, and each
    latent's index into them."""

    round_index: int
    latents: torch.Tensor
    prompts: list[str]
    prompt_index: torch.Tensor

    @classmethod
    def from_round(cls, round_index: int, round_dir: RoundDir) -> RoundSet:
        rows = round_dir.selected_rows()
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
        position = {p: i for i, p in enumerate(prompts)}
        return cls(round_index, round_dir.latents(rows), prompts, torch.tensor([position[row["prompt"]] for row in rows]))

    @classmethod
    def union(cls, round_index: int, sets: list[RoundSet]) -> RoundSet:
        """The sets one after another as round ``round_index``'s set (``train.restart``): the latents concatenated in
        order, the prompts merged in order of first appearance, each latent's index pointing into the merged list.
        Its samples' (t, noise) are drawn for ``round_index``, as any round's set's."""
        prompts = list(dict.fromkeys(p for s in sets for p in s.prompts))
        position = {p: i for i, p in enumerate(prompts)}
        index = [torch.tensor([position[p] for p in s.prompts], dtype=torch.long)[s.prompt_index] for s in sets]
        return cls(round_index, torch.cat([s.latents for s in sets]), prompts, torch.cat(index))


class FinetuneSet(Dataset):
    """``length`` samples drawn from the current round's selected latents, each with its own t and noise.

    The set has a fixed length and is filled with each round's latents (``load``) when the round
    starts, so Lightning can size the epoch before the round is generated. Item ``i`` is latent
    ``perm_e[i % n]`` with ``e = i // n`` (a fresh shuffle every pass), a timestep
    t ~ U{t_min..t_max-1} and noise from a generator seeded by (seed, round, i); with probability
    ``empty_prompt_prob`` (drawn last from that generator) its prompt is ``EMPTY_PROMPT``.
    """

    def __init__(self, length: int, *, seed: int, t_range: tuple[int, int], empty_prompt_prob: float = 0.0) -> None:
        self.length = length
        self.seed = seed
        self.t_range = t_range
        self.empty_prompt_prob = empty_prompt_prob
        self.round_index = 0
        self.latents: torch.Tensor | None = None
        self.prompt_index: torch.Tensor | None = None
        self._perms: dict[int, torch.Tensor] = {}

    def load(self, round_set: RoundSet) -> None:
        """Serve a round's set."""
        self.round_index, self.latents, self.prompt_index = round_set.round_index, round_set.latents, round_set.prompt_index
        self._perms = {}

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.round_index, epoch, 0))
            self._perms[epoch] = torch.randperm(len(self.latents), generator=g)
        return self._perms[epoch]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.latents is None:
            raise RuntimeError("no round's set is loaded: the MIRounds callback loads each round before it trains")
        n = len(self.latents)
        j = self._perm(i // n)[i % n]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.round_index, i, 1))
        t = torch.randint(self.t_range[0], self.t_range[1], (), generator=g)
        noise = torch.randn(self.latents.shape[1:], generator=g)
        prompt = self.prompt_index[j]
        if self.empty_prompt_prob and torch.rand((), generator=g) < self.empty_prompt_prob:
            prompt = torch.tensor(EMPTY_PROMPT)
        return {"latents": self.latents[j], "prompt": prompt, "t": t, "noise": noise}


class RankSampler(Sampler[int]):
    """Rank ``rank`` of ``world`` takes every ``world``-th index, after skipping ``skip`` of its own.

    Each optimizer step covers one contiguous block of the index stream whatever the
    layout, and ``skip`` lets a resumed epoch continue where its checkpoint was taken.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1) -> None:
        self.length, self.rank, self.world = length, rank, world
        self.skip = 0

    def _indices(self) -> range:
        return range(self.rank + self.skip * self.world, self.length, self.world)

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        self.skip = 0  # a restored position holds for the pass it was saved in only
        return iter(indices)

    def __len__(self) -> int:
        """The whole epoch's count, skipped part included: Lightning counts a resumed epoch's
        batches from where its checkpoint was taken."""
        return len(range(self.rank, self.length, self.world))


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning's checkpoints.

    ``progress()`` returns (epoch, micro-batches processed in it); Lightning saves it with
    ``state_dict`` and hands it back through ``load_state_dict`` before iterating again.
    """

    def __init__(self, dataset: FinetuneSet, micro_batch: int, rank: int, world: int,
                 progress: Callable[[], tuple[int, int]]) -> None:
        self.rank_sampler = RankSampler(len(dataset), rank, world)
        super().__init__(dataset, batch_size=micro_batch, sampler=self.rank_sampler)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, processed = self.progress()
        return {"epoch": epoch, "processed": processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, _ = self.progress()
        if state["epoch"] == epoch:
            self.rank_sampler.skip = state["processed"] * self.batch_size


class FinetuneData(L.LightningDataModule):
    """Serves the current round's set (handed over by ``mitune.rounds.loop.MIRounds``); a resumed epoch
    continues after its last completed batch."""

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
