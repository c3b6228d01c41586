"""Paired contrasts between evaluated models, with bootstrap intervals over prompts and training seeds.

A contrast ``A-B`` names two methods (``base``: round 0, the model before fine-tuning) and is made
at each round r >= 1 (A at round r against B at round r, or against the base model), CFG and
category (and ``all``). Its unit is a (training seed, prompt) cell: the mean score of the prompt's
images under A minus under B for the same seed, so the evaluation noise they share cancels (the
toy evaluates every run of a seed with that seed's noise). ``mean_diff`` is the mean over cells.

The interval is a crossed ("pigeonhole", Owen 2007) bootstrap: each resample redraws the training
seeds and, independently, the prompts, with replacement, and averages the cells where they cross.
Every seed is evaluated on the same prompts, so a prompt that favours A tends to do so under every
seed: a nested bootstrap (prompts redrawn within each seed) would count a prompt's cells as
independent and understate the prompt spread, and redrawing prompts alone would leave out the
spread between training runs. Redrawing whole rows and columns keeps both, and A and B stay
paired because the units redrawn are differences. Percentile interval of 10,000 resamples from a
seeded generator (each row's own, so a row does not depend on what else was asked). With three
seeds the seed level has few distinct draws and the bootstrap scales its spread by sqrt(2/3):
read the intervals as approximate; with one seed they cover the prompts only.

``best_contrast_table`` makes the same contrasts with each side at its own (round, CFG), the point
``mitune.summary --dev`` chose for it on other prompts (rows with round and cfg ``best``).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mitune.runs.io import read_jsonl

log = logging.getLogger(__name__)

BASE = "base"
COLUMNS = ["contrast", "category", "round", "cfg", "mean_diff", "ci_low", "ci_high", "n_prompts", "n_seeds"]
Prompt = tuple[int, str]  # (prompt_id, prompt): one val prompt, the same under every seed
Point = tuple[str, int, float]  # (method or "base", round, cfg)


class ContrastError(ValueError):
    """A contrast names no evaluated method, or the jobs have no per-image scores of the metric."""


class Job(NamedTuple):
    """One evaluation job: its point and its per-image scores (``scores.jsonl``)."""

    method: str  # "base" for round 0, whichever run it was evaluated from
    round: int
    cfg: float
    train_seed: str
    scores: Path
    category: str | None  # the job's only category, for scores written before images carried theirs


def prompt_means(jobs: Sequence[Job], metric: str) -> tuple[dict[Point, dict[tuple[str, Prompt], float]],
                                                           dict[Prompt, str | None]]:
    """Per point, the mean score of each (training seed, prompt) cell over its images; each prompt's category."""
    sums: dict[Point, dict[tuple[str, Prompt], list[float]]] = defaultdict(lambda: defaultdict(list))
    category: dict[Prompt, str | None] = {}
    for job in jobs:
        for row in read_jsonl(job.scores):
            if metric not in row:
                raise ContrastError(f"{job.scores} has no per-image {metric!r} scores; keys: {sorted(row)}")
            prompt = (row["prompt_id"], row["prompt"])
            sums[(job.method, job.round, job.cfg)][(job.train_seed, prompt)].append(row[metric])
            category[prompt] = row.get("category", job.category) or category.get(prompt)
    return {point: {cell: sum(v) / len(v) for cell, v in cells.items()} for point, cells in sums.items()}, category


def split_contrast(name: str, methods: set[str]) -> tuple[str, str]:
    """``A-B`` into its sides; method names may hold "-", so it splits where both sides are known. A side may pin
    a round, ``method@r`` (e.g. ``mi@2-mi@1``: round 2 against round 1 of one method)."""
    known = methods | {BASE}
    method = lambda side: re.sub(r"@\d+$", "", side)  # noqa: E731
    sides = [(name[:i], name[i + 1:]) for i, c in enumerate(name)
             if c == "-" and {method(name[:i]), method(name[i + 1:])} <= known]
    if len(sides) != 1:
        raise ContrastError(f"contrast {name!r} is not A-B of two evaluated methods or {BASE} (a side may be "
                            f"method@round); evaluated: {sorted(methods)}")
    return sides[0]


def pinned(side: str) -> tuple[str, int | None]:
    """A contrast side's method and the round it pins (``mi@2``; the base model is round 0), or None."""
    found = re.fullmatch(r"(.+)@(\d+)", side)
    if found:
        return found[1], int(found[2])
    return side, (0 if side == BASE else None)


def crossed_bootstrap(diffs: np.ndarray, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean cell of ``diffs`` [seeds, prompts] (NaN: no pair) with seeds and
    prompts redrawn independently; a redraw is a count per seed and per prompt, so no cell is copied."""
    rng = np.random.default_rng(seed)
    present = ~np.isnan(diffs)
    values = np.where(present, diffs, 0.0)
    (n_seeds, n_prompts), tail = diffs.shape, 50 * (1 - level)
    seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)
    prompts = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=resamples)
    sums = ((seeds @ values) * prompts).sum(1)
    counts = ((seeds @ present) * prompts).sum(1)
    low, high = np.percentile(sums[counts > 0] / counts[counts > 0], [tail, 100 - tail])
    return float(low), float(high)


def contrast_row(name: str, category: str, r: int | str, cfg: float | str, cells: dict[tuple[str, Prompt], float],
                 resamples: int, seed: int) -> dict[str, Any]:
    seeds = sorted({s for s, _ in cells})
    prompts = sorted({p for _, p in cells})
    diffs = np.full((len(seeds), len(prompts)), np.nan)
    for (s, p), d in cells.items():
        diffs[seeds.index(s), prompts.index(p)] = d
    low, high = crossed_bootstrap(diffs, resamples, seed)
    return {"contrast": name, "category": category, "round": r, "cfg": cfg, "mean_diff": float(np.nanmean(diffs)),
            "ci_low": low, "ci_high": high, "n_prompts": len(prompts), "n_seeds": len(seeds)}


def paired_rows(name: str, sides: tuple[str, str], side_a: dict[tuple[str, Prompt], float],
                side_b: dict[tuple[str, Prompt], float], category: dict[Prompt, str | None], at: tuple[Any, Any],
                where: str, resamples: int, seed: int, skipped: list[str]) -> list[dict[str, Any]]:
    """One contrast's rows (``all``, then each category) at ``at`` (round, cfg) from the cells both sides have;
    cells of one side only are noted in ``skipped``, ``where`` naming the point."""
    both = side_a.keys() & side_b.keys()
    for side, other in ((side_a, sides[1]), (side_b, sides[0])):
        alone = sorted({s or "none" for s, _ in side.keys() - both})
        if alone:
            skipped.append(f"{name} {where}: cells of seed(s) {', '.join(alone)} lack {other}")
    cells = {cell: side_a[cell] - side_b[cell] for cell in both}
    groups = ["all", *sorted({category[p] for _, p in cells if category[p] is not None})] if cells else []
    return [contrast_row(name, c, *at, {cell: d for cell, d in cells.items() if c == "all" or category[cell[1]] == c},
                         resamples, seed) for c in groups]


def warn_about(rows: Sequence[dict[str, Any]], skipped: Sequence[str]) -> None:
    if skipped:
        log.warning("paired contrasts skip cells that one side lacks: %s", "; ".join(skipped))
    if any(row["n_seeds"] == 1 for row in rows):
        log.warning("some contrasts have one training seed: their intervals cover prompts only")


def contrast_table(jobs: Sequence[Job], metric: str, contrasts: Sequence[str], resamples: int = 10_000,
                   seed: int = 0) -> list[dict[str, Any]]:
    """One row (``COLUMNS``) per contrast, round >= 1, CFG and category (``all`` first), from the paired cells;
    cells of one side only are skipped with one warning naming them (a point one side lacks entirely, silently)."""
    means, category = prompt_means(jobs, metric)
    methods = {method for method, _, _ in means} - {BASE}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name in contrasts:
        (a, ra), (b, rb) = (pinned(side) for side in split_contrast(name, methods))
        if (ra is None) != (rb is None) and BASE not in (a, b):
            raise ContrastError(f"contrast {name!r} pins the round of one side only: pin both (method@round) or neither")
        if ra is not None and rb is not None:  # both rounds pinned: one row per CFG, its round "ra vs rb"
            points = sorted({(f"{ra} vs {rb}", g) for _, _, g in means})
        else:
            points = sorted({(r, g) for m, r, g in means if m in (a, b) and r > 0})
        for r, g in points:
            side_a, side_b = (means.get((m, pin if pin is not None else r, g), {}) for m, pin in ((a, ra), (b, rb)))
            if side_a and side_b:  # else a point one side never evaluated (a round it did not train): no row
                rows += paired_rows(name, (a, b), side_a, side_b, category, (r, g), f"round {r} CFG {g:g}",
                                    resamples, seed, skipped)
    warn_about(rows, skipped)
    return rows


def best_contrast_table(jobs: Sequence[Job], metric: str, contrasts: Sequence[str],
                        best: dict[str, tuple[int, float]], resamples: int = 10_000,
                        seed: int = 0) -> list[dict[str, Any]]:
    """As ``contrast_table``, each side at its own point ``best[method]`` (round, cfg; ``base`` at round 0), rows
    with round and cfg ``best``: the protocol that picks each method's point on other (dev) prompts."""
    means, category = prompt_means(jobs, metric)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name in contrasts:
        a, b = split_contrast(name, set(best) - {BASE})
        if a not in best or b not in best:
            raise ContrastError(f"contrast {name!r} pins a round; at best points each side's round is chosen on dev")
        side_a, side_b = (means.get((m, *best[m]), {}) for m in (a, b))
        where = " vs ".join(f"{m} R={best[m][0]} CFG {best[m][1]:g}" for m in (a, b))
        rows += paired_rows(name, (a, b), side_a, side_b, category, ("best", "best"), f"at best points ({where})",
                            resamples, seed, skipped)
    warn_about(rows, skipped)
    return rows


def contrasts_markdown(rows: Sequence[dict[str, Any]], metric: str, best: dict[str, tuple[int, float]] | None = None) -> str:
    """The table for reading: mean difference [95% CI], bold where the interval excludes 0; rows at ``best``
    points (``best_contrast_table``) say each side's round and CFG."""
    lines = [f"Paired contrasts of {metric} (A minus B per training seed and prompt; 95% bootstrap CI over "
             "training seeds and prompts, crossed; bold: the interval excludes 0; see mitune/contrasts.py)\n",
             *(["Each side at its own best (round, CFG), chosen on the dev prompts (best.md); pairs of the test prompts.\n"]
               if best is not None else []),
             "| contrast | category | round | CFG | mean diff [95% CI] | prompts | seeds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cell = f"{row['mean_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        bold = row["ci_low"] > 0 or row["ci_high"] < 0
        if best is not None:
            (ra, ga), (rb, gb) = (best[m] for m in split_contrast(row["contrast"], set(best) - {BASE}))
            point = f"best (R={ra} vs R={rb}) | {ga:g} vs {gb:g}"
        else:
            point = f"{row['round']} | {row['cfg']:g}"
        lines.append(f"| {row['contrast']} | {row['category']} | {point} | "
                     f"{f'**{cell}**' if bold else cell} | {row['n_prompts']} | {row['n_seeds']} |")
    if any(row["n_seeds"] == 1 for row in rows):
        lines.append("\nRows with one seed: the interval covers prompts only, not training runs.")
    return "\n".join(lines) + "\n"
