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

With ``generation.prune`` (successive halving by partial MI), the round is sampled by
``mitune.mi.sampler.ContinuousSampler``: rows of stopped candidates are refilled with the next prompts'
candidates, and the batch keeps its shape, so a candidate's numbers do not depend on its neighbours and a
resumed round is still byte-identical. A stopped candidate is a row with ``pruned_at`` (the steps it ran)
and its partial MI, without an image or latents; every row of such a round has ``pruned_at`` (None for
the candidates that finished). Decoding, PNG encoding and writes run on one writer thread (``Writer``),
overlapping the sampling of the next micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from mitune.mi.sampler import Candidate, ContinuousSampler, Outcome, Samples, sample
from mitune.rounds.settings import GenerationConfig
from mitune.runs import io as mio
from mitune.runs.artifacts import RoundDir, as_round_dir, finished
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
    generation = json.loads(json.dumps(asdict(config)))
    if not config.prune:  # rounds made before generation.prune existed hold no such key
        del generation["prune"]
    return {
        "model": str(pipe.config._name_or_path),
        "dtype": str(pipe.unet.dtype),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_hash,
        "generation": generation,
    }


# Generation settings a resume may change: they decide how candidates are batched, not which ones (a batch of
# another size gives them equal up to float rounding), and lowering one is the way out of an out-of-memory error.
BATCHING = ("micro_batch",)


def compared(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the batching keys (``BATCHING``): what two starts of a round must share."""
    generation = {k: v for k, v in settings.get("generation", {}).items() if k not in BATCHING}
    return {**settings, "generation": generation}


def check_settings(round_dir: RoundDir, settings: dict[str, Any]) -> bool:
    """Whether the settings file exists; if it does, it must hold ``settings`` (the batching keys aside)."""
    settings_file = round_dir.settings_file
    if not settings_file.exists():
        return False
    try:
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{settings_file} is corrupt ({err}); delete the round dir {round_dir.path} to regenerate it") from err
    previous, settings = compared(previous), compared(settings)
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


Result = tuple[torch.Tensor | None, Image.Image | None, dict[str, Any]]
"""One candidate's latents, image and scores (``mi`` and the ``scores`` asked for), plus ``mi_map``; a
pruned candidate's is (None, None, {"mi": its partial MI, "pruned_at": the steps it ran})."""


def batch_results(samples: Samples, images: list[Image.Image]) -> list[Result]:
    extra: dict[str, list] = {"mi": samples.mi.tolist()}
    if samples.phrase_mi is not None:
        extra["phrase_mi"] = samples.min_phrase_mi().tolist()
    if samples.mi_maps is not None:
        extra["mi_map"] = list(samples.mi_maps.cpu())
    return [(z0, image, {k: v[i] for k, v in extra.items()})
            for i, (z0, image) in enumerate(zip(samples.latents.float().cpu(), images))]


def outcome_results(pipe: DiffusionPipeline, outcomes: list[Outcome]) -> dict[int, Result]:
    """A pruned round's prompt: its finished candidates decoded together (in candidate order, so the images
    do not depend on the schedule), its pruned ones as their partial MI."""
    finished = [o for o in outcomes if o.pruned_at is None]
    images = decode_latents(pipe, torch.stack([o.latents for o in finished]))
    results: dict[int, Result] = {o.index: (None, None, {"mi": o.mi, "pruned_at": o.pruned_at}) for o in outcomes}
    for o, image in zip(finished, images):
        results[o.index] = (o.latents.float().cpu(), image, {"mi": o.mi, "pruned_at": None})
    return results


def commit_prompt(round_dir: RoundDir, prompt: str, jobs: list[Job], results: dict[int, Result],
                  config: GenerationConfig) -> None:
    """Write one prompt's images and latents, then its rows (the commit marker). Latents are kept for the
    finished candidates only (``candidates`` names them when some were pruned)."""
    pid = jobs[0].prompt_id
    latents_name = round_dir.latents_name(pid)
    finished = [j for j in jobs if results[j.candidate][0] is not None]
    tensors = {"latents": torch.stack([results[j.candidate][0] for j in finished]),
               "mi": torch.tensor([results[j.candidate][2]["mi"] for j in finished], dtype=torch.float32)}
    if len(finished) < len(jobs):
        tensors["candidates"] = torch.tensor([j.candidate for j in finished])
    if config.save_mi_maps:
        tensors["mi_maps"] = torch.stack([results[j.candidate][2]["mi_map"] for j in jobs])
        for j in jobs:
            _, image, scores = results[j.candidate]
            mio.write_png(round_dir.path / round_dir.mi_map_name(pid, j.candidate), overlay(image, scores["mi_map"]))
    mio.write_safetensors(round_dir.path / latents_name, tensors, {"prompt": prompt})
    rows = []
    for j in jobs:
        latents, image, scores = results[j.candidate]
        file_name = round_dir.image_name(pid, j.candidate) if image is not None else None
        if image is not None:
            mio.write_png(round_dir.path / file_name, image)
        rows.append({"file_name": file_name, "prompt": prompt, "prompt_id": pid, "candidate": j.candidate,
                     "seed": j.seed, **{k: v for k, v in scores.items() if k != "mi_map"},
                     "latents": latents_name if latents is not None else None})
    mio.write_jsonl(round_dir.part(pid), rows)


def candidate_rows(round_dir: RoundDir, num_prompts: int) -> list[dict[str, Any]]:
    """Every prompt's committed rows, in prompt order."""
    return [row for pid in range(num_prompts) for row in mio.read_jsonl(round_dir.part(pid))]


def mi_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """MI statistics of the finished candidates (a pruned one's MI is partial); ``num_pruned`` when any were."""
    images = finished(rows)
    mi = torch.tensor([r["mi"] for r in images], dtype=torch.float64)
    stats = {"num_prompts": len({r["prompt_id"] for r in rows}), "num_images": len(images),
             "mean_mi": mi.mean().item(), "median_mi": mi.median().item()}
    if len(images) < len(rows):
        stats["num_pruned"] = len(rows) - len(images)
    return stats


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


class Writer:
    """One background thread for a round's CPU work (VAE decode, PNG encoding, writes), so it overlaps the
    sampling of the next micro-batch. Tasks run in submission order; at most ``depth`` wait (bounded
    memory); the first error is raised in the sampling thread at the next ``submit`` or at the end, and
    tasks already submitted are finished before the round ends either way (their prompts are kept)."""

    def __init__(self, enabled: bool = True, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mitune-writer") if enabled else None
        self.depth = depth
        self.futures: deque[Future] = deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.futures.append(self.pool.submit(fn, *args))
        while len(self.futures) > self.depth or (self.futures and self.futures[0].done()):
            self.futures.popleft().result()

    def close(self) -> None:
        """Finish every submitted task; raises the first error."""
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


class Timer:
    """Seconds per stage of a round, summed (``generate_round(timings=...)``); each stage is added to by
    one thread only (sample: the sampling thread; decode, write: the writer)."""

    def __init__(self, into: dict[str, float] | None) -> None:
        self.into = into

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        if self.into is not None:
            self.into[stage] = self.into.get(stage, 0.0) + now - since
        return now

    def count(self, key: str, value: float) -> None:
        if self.into is not None:
            self.into[key] = self.into.get(key, 0.0) + value


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
    overlap: bool = True,
    timings: dict[str, float] | None = None,
) -> RoundDir:
    """Sample and write every prompt's candidates; resumes a partly done ``round_dir``. The caller
    completes the folder (``finish_round`` or ``mitune.rounds.selection.select_round``).

    With ``world_size`` > 1, rank r takes every world_size-th micro-batch (whole prompts) and writes its
    prompts into the shared ``round_dir``; the caller synchronises the ranks before completing it.
    ``stop`` is called before each micro-batch and may raise to end the round early (finished prompts
    are kept). ``overlap=False`` decodes and writes in the sampling thread (for measuring the writer
    thread); ``timings`` receives seconds per stage (sample, decode, write, wall) and UNet rows.
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
    skip = set(done)
    # One tick per micro-batch, rate averaged over the whole round (smoothing=0): a true ETA from the first tick.
    bar = tqdm(total=len(mine), initial=sum(j.prompt_id in skip for j in mine), unit="img", smoothing=0,
               desc=f"{round_dir.name} generate" + (f" (rank {rank})" if world_size > 1 else ""),
               disable=not progress, leave=leave, dynamic_ncols=True)
    timer, start = Timer(timings), time.perf_counter()

    def commit(pid: int, results: dict[int, Result]) -> None:
        since = time.perf_counter()
        commit_prompt(round_dir, prompts[pid], jobs_by_prompt[pid], results, config)
        done.add(pid)
        timer.add("write", since)

    writer = Writer(overlap)
    try:
        if config.prune:
            sample_pruned(pipe, prompts, [j for j in mine if j.prompt_id not in skip], config, writer, timer, commit,
                          bar, stop)
        else:
            sample_batches(pipe, prompts, [b for b in batches if not all(j.prompt_id in skip for j in b)], skip,
                           config, scores, writer, timer, commit, bar, stop)
    finally:
        writer.close()
    timer.add("wall", start)
    bar.close()
    return round_dir


def sample_batches(pipe: DiffusionPipeline, prompts: list[str], batches: list[list[Job]], skip: set[int],
                   config: GenerationConfig, scores: Sequence[str], writer: Writer, timer: Timer, commit: Callable[[int, dict[int, Result]], None],
                   bar: tqdm, stop: Callable[[], None] | None) -> None:
    """The paper's round: fixed micro-batches, a prompt committed once all its candidates are decoded."""
    pending: dict[int, dict[int, Result]] = {}  # touched by the writer thread only

    def write(batch: list[Job], samples: Samples) -> None:
        since = time.perf_counter()
        results = batch_results(samples, decode_latents(pipe, samples.latents))
        timer.add("decode", since)
        for j, result in zip(batch, results):
            if j.prompt_id in skip:  # committed before a resume; its batch is shared with a prompt that was not
                continue
            mine_so_far = pending.setdefault(j.prompt_id, {})
            mine_so_far[j.candidate] = result
            if len(mine_so_far) == config.num_candidates:
                commit(j.prompt_id, pending.pop(j.prompt_id))

    for batch in batches:
        if stop is not None:
            stop()
        since = time.perf_counter()
        samples = generate_batch(pipe, prompts, batch, config, scores)
        timer.add("sample", since)
        timer.count("unet_rows", 2 * len(batch) * config.num_inference_steps)
        writer.submit(write, batch, samples)
        bar.update(sum(j.prompt_id not in skip for j in batch))


def sample_pruned(pipe: DiffusionPipeline, prompts: list[str], jobs: list[Job], config: GenerationConfig,
                  writer: Writer, timer: Timer, commit: Callable[[int, dict[int, Result]], None], bar: tqdm,
                  stop: Callable[[], None] | None) -> None:
    """Successive halving with continuous batching (``ContinuousSampler``): each prompt is decoded and
    committed once its last candidate finished."""
    sampler = ContinuousSampler(pipe, config.sampling, config.micro_batch, config.prune_points, config.top_k)

    def write(pid: int, outcomes: list[Outcome]) -> None:
        since = time.perf_counter()
        results = outcome_results(pipe, outcomes)
        timer.add("decode", since)
        commit(pid, results)

    candidates = [Candidate(j.prompt_id, j.candidate, prompts[j.prompt_id], j.seed) for j in jobs]
    since = time.perf_counter()
    for pid, outcomes in sampler.run(candidates, stop):
        since = timer.add("sample", since)
        writer.submit(write, pid, outcomes)
        bar.update(len(outcomes))
        since = time.perf_counter()
    timer.add("sample", since)
    timer.count("unet_rows", sampler.unet_rows)
    timer.count("idle_rows", sampler.idle_rows)
