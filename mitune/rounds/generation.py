"""A generation round: M candidates per prompt, each with its MI, written as a resumable image folder.

Every candidate is sampled with ``mitune.mi.sample`` (its MI accumulated along the chain, Algorithm 2)
plus whatever a selection strategy asked to be computed while sampling (``scores``: per-phrase MI).
The round is written as a ``mitune.runs.artifacts.RoundDir`` (a Hugging Face ``imagefolder``): per
prompt, its images, latents and rows (file_name, prompt, prompt_id, candidate, seed, mi, latents and
the extra scores). Nothing is selected here: a training round's set is marked afterwards by
``mitune.rounds.selection``, and an evaluation point is finished as it is (``finish_round``).

A prompt is committed only after its images and latents are on disk, so a round killed at any point
resumes without losing or duplicating work. Each candidate has its own seed and generator, and
micro-batches are cut from the full job list the same way on every run, so a resumed round is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from mitune.mi.maps import overlay
from mitune.mi.phrases import check_phrases, prompt_phrases
from mitune.mi.pipeline import decode_latents
from mitune.mi.sampler import Samples, sample
from mitune.rounds.settings import GenerationConfig
from mitune.runs import io as mio
from mitune.runs.artifacts import RoundDir, as_round_dir
from mitune.runs.seeds import candidate_seed

log = logging.getLogger(__name__)

SAMPLING_SCORES = ("phrase_mi",)
"""Scores ``generate_round`` can compute while sampling, beside MI: ``phrase_mi``, each candidate's
smallest per-phrase conditional MI (P more UNet rows per step for P phrases)."""


@dataclass(frozen=True)
class Job:
    prompt_id: int
    candidate: int
    seed: int


def make_jobs(prompts: list[str], config: GenerationConfig) -> list[Job]:
    return [
        Job(pid, c, candidate_seed(config.seed, prompt, c, config.seed_mode))
        for pid, prompt in enumerate(prompts)
        for c in range(config.num_candidates)
    ]


def round_settings(pipe: DiffusionPipeline, prompts: list[str], config: GenerationConfig) -> dict[str, Any]:
    """Everything that determines the round's output; a resume must reproduce it exactly."""
    prompts_hash = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "model": str(pipe.config._name_or_path),
        "dtype": str(pipe.unet.dtype),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_hash,
        "generation": json.loads(json.dumps(asdict(config))),
    }


def check_settings(round_dir: RoundDir, settings: dict[str, Any]) -> bool:
    """Whether the settings file exists; if it does, it must hold exactly ``settings``."""
    settings_file = round_dir.settings_file
    if not settings_file.exists():
        return False
    try:
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{settings_file} is corrupt ({err}); delete the round dir {round_dir.path} to regenerate it") from err
    if previous != settings:
        changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
        raise ValueError(
            f"{round_dir.path} holds a round made with different settings ({', '.join(changed)}); "
            "resume with the same settings or choose a new output dir"
        )
    return True


def prepare_round_dir(round_dir: RoundDir, settings: dict[str, Any], write: bool = True) -> set[int]:
    """Create or reopen a round dir; returns the prompt ids already committed.

    Only one rank writes the settings file; the others check it when it is there.
    """
    if not check_settings(round_dir, settings) and write:
        mio.write_json(round_dir.settings_file, settings)
    return round_dir.done_prompts()


def generate_batch(pipe: DiffusionPipeline, prompts: list[str], jobs: list[Job], config: GenerationConfig,
                   scores: Sequence[str] = ()) -> Samples:
    """Sample one micro-batch (``mitune.mi.sample``): one text-encoder pass per distinct prompt in it."""
    rows = [prompts[j.prompt_id] for j in jobs]
    phrases = [prompt_phrases(p) for p in rows] if "phrase_mi" in scores else None
    return sample(pipe, rows, [j.seed for j in jobs], config.sampling, phrases=phrases, return_map=config.save_mi_maps)


Result = tuple[torch.Tensor, Image.Image, dict[str, Any]]
"""One candidate's latents, image and scores (``mi`` and the ``scores`` asked for), plus ``mi_map``."""


def batch_results(samples: Samples, images: list[Image.Image]) -> list[Result]:
    extra: dict[str, list] = {"mi": samples.mi.tolist()}
    if samples.phrase_mi is not None:
        extra["phrase_mi"] = samples.min_phrase_mi().tolist()
    if samples.mi_maps is not None:
        extra["mi_map"] = list(samples.mi_maps.cpu())
    return [(z0, image, {k: v[i] for k, v in extra.items()})
            for i, (z0, image) in enumerate(zip(samples.latents.float().cpu(), images))]


def commit_prompt(round_dir: RoundDir, prompt: str, jobs: list[Job], results: dict[int, Result],
                  config: GenerationConfig) -> None:
    """Write one prompt's images and latents, then its rows (the commit marker)."""
    pid = jobs[0].prompt_id
    latents_name = round_dir.latents_name(pid)
    tensors = {"latents": torch.stack([results[j.candidate][0] for j in jobs]),
               "mi": torch.tensor([results[j.candidate][2]["mi"] for j in jobs], dtype=torch.float32)}
    if config.save_mi_maps:
        tensors["mi_maps"] = torch.stack([results[j.candidate][2]["mi_map"] for j in jobs])
        for j in jobs:
            _, image, scores = results[j.candidate]
            mio.write_png(round_dir.path / round_dir.mi_map_name(pid, j.candidate), overlay(image, scores["mi_map"]))
    mio.write_safetensors(round_dir.path / latents_name, tensors, {"prompt": prompt})
    rows = []
    for j in jobs:
        _, image, scores = results[j.candidate]
        file_name = round_dir.image_name(pid, j.candidate)
        mio.write_png(round_dir.path / file_name, image)
        rows.append({"file_name": file_name, "prompt": prompt, "prompt_id": pid, "candidate": j.candidate,
                     "seed": j.seed, **{k: v for k, v in scores.items() if k != "mi_map"}, "latents": latents_name})
    mio.write_jsonl(round_dir.part(pid), rows)


def candidate_rows(round_dir: RoundDir, num_prompts: int) -> list[dict[str, Any]]:
    """Every prompt's committed rows, in prompt order."""
    return [row for pid in range(num_prompts) for row in mio.read_jsonl(round_dir.part(pid))]


def mi_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    mi = torch.tensor([r["mi"] for r in rows], dtype=torch.float64)
    return {"num_prompts": len({r["prompt_id"] for r in rows}), "num_images": len(rows),
            "mean_mi": mi.mean().item(), "median_mi": mi.median().item()}


def finish_round(round_dir: RoundDir | Path, num_prompts: int) -> dict[str, float]:
    """Complete an image folder that nothing selects from (an evaluation point): its rows and MI statistics."""
    round_dir = as_round_dir(round_dir)
    rows = candidate_rows(round_dir, num_prompts)
    stats = mi_stats(rows)
    round_dir.complete(rows, stats)
    return stats


def micro_batches(jobs: list[Job], micro_batch: int) -> list[list[Job]]:
    """Cut the job list into full micro-batches (only the last may be short); a prompt may
    straddle two batches.

    The cut depends only on (prompts, M, micro_batch), so every run, resume and rank computes
    each batch identically; ``rank_batches`` keeps each prompt on one rank.
    """
    return [jobs[i : i + micro_batch] for i in range(0, len(jobs), micro_batch)]


def rank_batches(batches: list[list[Job]], rank: int, world_size: int) -> list[list[Job]]:
    """Rank ``rank``'s share of the batches: every world_size-th group of batches chained by the
    prompts they share, so each prompt is generated whole by one rank (a prompt is committed only
    with all its M candidates; split between ranks, it never would be). A group holds
    lcm(M, micro_batch) jobs: one batch or one prompt when either divides the other."""
    groups: list[list[list[Job]]] = []
    for batch in batches:
        if groups and groups[-1][-1][-1].prompt_id == batch[0].prompt_id:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [batch for group in groups[rank::world_size] for batch in group]


def generate_round(
    pipe: DiffusionPipeline,
    prompts: list[str],
    config: GenerationConfig,
    round_dir: RoundDir | str | Path,
    *,
    scores: Sequence[str] = (),
    progress: bool = True,
    leave: bool = True,
    rank: int = 0,
    world_size: int = 1,
    stop: Callable[[], None] | None = None,
) -> RoundDir:
    """Sample and write every prompt's candidates; resumes a partly done ``round_dir``. The caller
    completes the folder (``finish_round`` or ``mitune.rounds.selection.select_round``).

    With ``world_size`` > 1, rank r takes every world_size-th micro-batch (whole prompts) and writes its
    prompts into the shared ``round_dir``; the caller synchronises the ranks before completing it.
    ``stop`` is called before each micro-batch and may raise to end the round early (finished prompts
    are kept).
    """
    unknown = set(scores) - set(SAMPLING_SCORES)
    if unknown:
        raise ValueError(f"unknown sampling scores {sorted(unknown)}; known: {SAMPLING_SCORES}")
    if "phrase_mi" in scores:
        check_phrases(prompts)
    round_dir = as_round_dir(round_dir)
    mio.check_writable(round_dir.path)
    done = prepare_round_dir(round_dir, round_settings(pipe, prompts, config), write=rank == 0)
    jobs = make_jobs(prompts, config)
    batches = rank_batches(micro_batches(jobs, config.micro_batch), rank, world_size)
    mine = [j for batch in batches for j in batch]
    jobs_by_prompt = {pid: jobs[pid * config.num_candidates : (pid + 1) * config.num_candidates] for pid in range(len(prompts))}
    pending: dict[int, dict[int, Result]] = {}
    # One tick per micro-batch, rate averaged over the whole round (smoothing=0): a true ETA from the first tick.
    bar = tqdm(total=len(mine), initial=sum(j.prompt_id in done for j in mine), unit="img", smoothing=0,
               desc=f"{round_dir.name} generate" + (f" (rank {rank})" if world_size > 1 else ""),
               disable=not progress, leave=leave, dynamic_ncols=True)
    for batch in batches:
        if all(j.prompt_id in done for j in batch):
            continue
        if stop is not None:
            stop()
        samples = generate_batch(pipe, prompts, batch, config, scores)
        results = batch_results(samples, decode_latents(pipe, samples.latents))
        bar.update(sum(j.prompt_id not in done for j in batch))
        for j, result in zip(batch, results):
            if j.prompt_id in done:
                continue
            mine_so_far = pending.setdefault(j.prompt_id, {})
            mine_so_far[j.candidate] = result
            if len(mine_so_far) == config.num_candidates:
                commit_prompt(round_dir, prompts[j.prompt_id], jobs_by_prompt[j.prompt_id], mine_so_far, config)
                done.add(j.prompt_id)
                del pending[j.prompt_id]
    bar.close()
    return round_dir
