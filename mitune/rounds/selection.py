"""Top-k selection of each prompt's candidates (Algorithm 1, line 4): reads a generated round, marks its set.

``mi`` is MI-TUNE: the point-wise MI accumulated while sampling (free). ``phrase_mi`` ranks by
the smallest per-phrase conditional MI (``mitune.mi.phrases``), also from sampling: an image that
neglects one phrase of the prompt ranks low even when the rest of it carries much MI. ``random``
selects by chance (the control). Any other name is an alignment metric of the registry
(``mitune.metrics``) scoring the candidates' images, e.g. ``toy_oracle``, the toy world's exact
judge (an upper bound, like the paper's HPS-selected row), or ``clip_score``. A metric that scores under a
diffusion model (``mi_contrast``: ``mitune.metrics.mi.MIMetric``) scores under the round's model as it stands
when the round is selected (the base model at round 1), passed as ``pipe``; a rebuild without it is refused.

A strategy that needs a score computed while sampling names it (``sampling_scores``); generation
computes it and writes it with the candidates, and selection reads it from their rows.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from mitune.metrics import ALIGNMENT_METRICS, AlignmentMetric, build_alignment_metric
from mitune.metrics.mi import MIMetric
from mitune.mi.phrases import check_phrases
from mitune.rounds.generation import check_settings, mi_stats
from mitune.rounds.settings import GenerationConfig, check_top_k
from mitune.runs.artifacts import DamagedFolder, RoundDir, as_round_dir, finished
from mitune.runs.io import read_jsonl
from mitune.runs.seeds import mix_seed

log = logging.getLogger(__name__)

SAMPLED = ("mi", "phrase_mi", "random")
STRATEGIES = SAMPLED + tuple(name for name in ALIGNMENT_METRICS if name not in SAMPLED)


def sampling_scores(strategy: str) -> tuple[str, ...]:
    """What generation must compute while sampling for ``strategy`` to rank by it."""
    return ("phrase_mi",) if strategy == "phrase_mi" else ()


@cache
def selection_metric(name: str) -> AlignmentMetric:
    """The registry metric a strategy ranks by, built once per process."""
    return build_alignment_metric(name, progress=False)


def check_strategy(strategy: str, prompts: Sequence[str] = ()) -> None:
    """Unknown strategies, prompts without a phrase (``phrase_mi``) and prompts the selecting metric
    cannot score fail before any generation."""
    if strategy not in STRATEGIES:
        raise ValueError(f"generation.selection must be one of {STRATEGIES}, got {strategy!r}")
    if not prompts:
        return
    if strategy == "phrase_mi":
        check_phrases(prompts)
    elif strategy not in SAMPLED:
        try:
            selection_metric(strategy).check_prompts(list(prompts))
        except ValueError as err:
            raise ValueError(f"selection={strategy}: {err}") from None


def selection_scores(strategy: str, prompt: str, images: Sequence[Image.Image], mi: torch.Tensor,
                     generator: torch.Generator, phrase_mi: torch.Tensor | None = None,
                     pipe: DiffusionPipeline | None = None) -> torch.Tensor:
    """The score a strategy ranks one prompt's candidates by (higher is better); ``phrase_mi``
    is each candidate's smallest per-phrase MI, needed by the ``phrase_mi`` strategy, and ``pipe`` the
    round's model, needed by a metric that scores under one."""
    check_strategy(strategy)
    if strategy == "mi":
        return mi
    if strategy == "phrase_mi":
        if phrase_mi is None:
            raise ValueError("selection=phrase_mi needs each candidate's phrase MI")
        return phrase_mi
    if strategy == "random":
        return torch.rand(len(mi), generator=generator, dtype=torch.float64)
    metric = selection_metric(strategy)
    if isinstance(metric, MIMetric):
        if pipe is None:
            raise ValueError(f"selection={strategy} scores under the round's model, which is not given; delete the "
                             "round dir to generate and select the round again")
        metric.use_pipeline(pipe)
    return metric.score(list(images), [prompt] * len(images)).double()


def rank_by_score(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks, highest score first; ties go to the lower candidate index (stable)."""
    order = torch.sort(-scores.double(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(scores) + 1)
    return ranks


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks and a boolean mask of the k best candidates of one prompt."""
    check_top_k(len(scores), k)
    ranks = rank_by_score(scores)
    return ranks, ranks <= k


def select_prompt(round_dir: RoundDir, rows: list[dict[str, Any]], config: GenerationConfig,
                  pipe: DiffusionPipeline | None = None) -> list[dict[str, Any]]:
    """One prompt's rows with what selection ranked by (score), its rank and whether it is in the set.
    Only finished candidates are ranked; pruned ones (``generation.prune``) get no score or rank."""
    pruned = [row for row in rows if row.get("pruned_at") is not None]
    rows = finished(rows)
    prompt = rows[0]["prompt"]
    mi = torch.tensor([row["mi"] for row in rows], dtype=torch.float32)
    phrase_mi = torch.tensor([row["phrase_mi"] for row in rows], dtype=torch.float64) if "phrase_mi" in rows[0] else None
    images = []
    if config.selection not in SAMPLED:
        images = [Image.open(round_dir.path / row["file_name"]).convert("RGB") for row in rows]
    generator = torch.Generator().manual_seed(mix_seed(config.seed, "select", prompt))
    scores = selection_scores(config.selection, prompt, images, mi, generator, phrase_mi, pipe)
    ranks, selected = select_top_k(scores, config.top_k)
    marked = {row["candidate"]: {**row, "score": score, "rank": rank, "selected": sel}
              for row, score, rank, sel in zip(rows, scores.tolist(), ranks.tolist(), selected.tolist())}
    marked.update({row["candidate"]: {**row, "score": None, "rank": None, "selected": False} for row in pruned})
    return [marked[c] for c in sorted(marked)]


def select_round(round_dir: RoundDir | Path, num_prompts: int, config: GenerationConfig,
                 pipe: DiffusionPipeline | None = None) -> dict[str, float]:
    """Mark the top-k of every prompt of a generated round and complete the folder; returns its statistics
    (MI of all candidates and of the set). Deterministic, so rerunning it rebuilds the same set; ``pipe`` is
    the round's model, for a strategy that scores under it."""
    round_dir = as_round_dir(round_dir)
    rows = [row for pid in range(num_prompts)
            for row in select_prompt(round_dir, read_jsonl(round_dir.part(pid)), config, pipe)]
    images = finished(rows)
    mi = torch.tensor([r["mi"] for r in images], dtype=torch.float64)
    chosen = torch.tensor([r["selected"] for r in images])
    rest = mi[~chosen]
    stats = {**mi_stats(rows), "mean_selected_mi": mi[chosen].mean().item(),
             "selection_margin": (mi[chosen].mean() - rest.mean()).item() if len(rest) else 0.0}
    round_dir.complete(rows, stats)
    log.info("round done: %d prompts, %d images, mean MI %.4g, selected %.4g -> %s", stats["num_prompts"],
             stats["num_images"], stats["mean_mi"], stats["mean_selected_mi"], round_dir.path)
    return stats


def verify_round(round_dir: RoundDir | Path, settings: dict[str, Any], num_prompts: int, config: GenerationConfig) -> None:
    """Check a finished round before it is reused: its settings, every file against the size recorded when it
    completed, every row, and every file a row names.

    A damaged ``metadata.jsonl`` or ``summary.json`` is rebuilt from the per-prompt ``parts/`` (what they were made
    from) by selecting again; any other damaged or missing file is an error naming it. Rounds finished before
    mitune recorded sizes are checked by their rows and files only.
    """
    round_dir = as_round_dir(round_dir)
    if not check_settings(round_dir, settings):
        raise FileNotFoundError(f"finished round {round_dir.path} has no {round_dir.settings_file.name}; delete the "
                                "round dir to regenerate it")
    regenerate = f"; restore it, or delete the round dir {round_dir.path} to regenerate the round"
    rebuild = None
    try:
        sizes = round_dir.recorded_sizes()
    except FileNotFoundError:  # summary.json missing or damaged: rebuilt below
        sizes, rebuild = None, f"{round_dir.summary_file} is missing"
    except ValueError as err:
        sizes, rebuild = None, str(err)
    if sizes is not None:
        damaged = round_dir.damaged_files(sizes)
        unrebuildable = [d for d in damaged if not d.startswith(str(round_dir.metadata))]
        if unrebuildable:
            raise DamagedFolder(f"finished round {round_dir.path} is damaged: {unrebuildable[0]}{regenerate}")
        rebuild = rebuild or (damaged[0] if damaged else None)
    expected = num_prompts * config.num_candidates
    try:
        rows = round_dir.rows()
    except (OSError, ValueError) as err:
        rows, reason = [], str(err)
    else:
        reason = f"{len(rows)} rows, expected {num_prompts} prompts x {config.num_candidates} = {expected}"
    if len(rows) != expected:
        rebuild = f"{round_dir.metadata} is damaged ({reason})"
    if rebuild:
        missing = [pid for pid in range(num_prompts) if not round_dir.part(pid).is_file()]
        if missing:
            raise DamagedFolder(f"{rebuild} and {round_dir.part(missing[0])} is missing too; delete the round dir to "
                                "regenerate the round")
        try:
            select_round(round_dir, num_prompts, config)
        except ValueError as err:  # a part that does not parse
            raise DamagedFolder(f"{rebuild}, and rebuilding it from {round_dir.path / 'parts'} failed: {err}{regenerate}") from err
        log.warning("%s; rebuilt the round's metadata and summary from its parts", rebuild)
        rows = round_dir.rows()
    for row in finished(rows):  # a pruned candidate has neither image nor latents
        names = [row["latents"], row["file_name"]]
        if config.save_mi_maps:
            names.append(round_dir.mi_map_name(row["prompt_id"], row["candidate"]))
        for name in names:
            if not (round_dir.path / name).is_file():
                raise DamagedFolder(f"{round_dir.path / name} is missing{regenerate}")
