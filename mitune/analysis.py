"""Sec. 3.1 analyses of a generation round: does MI rank images the way another metric does?

* **Kendall tau** between MI and another metric over the images at chosen MI ranks of each prompt
  (paper: the 1st, 25th and 50th of M=50), averaged over prompts; plus tau over all those images
  pooled across prompts.
* **Score CDFs by MI rank** (Appendix J): the distribution of the other metric's scores over the
  prompts' rank-1 images, rank-25 images, ...; if MI agrees with the metric, better MI ranks
  have CDFs further right.

Ranks are 1-based (1 = highest MI, recomputed from ``metadata.jsonl``'s ``mi``) and given on a scale of
``reference_m`` candidates, mapped to the round's M: ranks (1, 25, 50) of 50 are (1, 2, 3) of 3.

``python -m mitune.analysis <round dir> --metric clip_score --out <dir>`` scores the round's
images itself; ``--scores <eval job>/scores.jsonl --score-key blip_vqa`` reuses the per-image
scores ``mitune.evaluate`` wrote for an evaluation folder (also a round dir).

Given training runs instead (run dirs or a sweep dir holding them), it writes ``rounds.csv``: per
run and round, the metric's mean over the candidates the run selected and over all of them (what
selection gained), and Kendall tau between MI and the metric.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from mitune.metrics import AlignmentMetric, build_alignment_metric, load_image_folder
from mitune.rounds.selection import rank_by_score
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RoundDir, RunDir, finished
from mitune.runs.io import csv_text, read_jsonl, save_figure, write_json, write_text

PAPER_RANKS = (1, 25, 50)
PAPER_M = GenerationConfig().num_candidates


@dataclass(frozen=True)
class KendallResult:
    """tau between MI and a metric over the images at ``ranks`` of each prompt."""

    metric: str
    ranks: list[int]
    mean_tau: float  # mean over the num_prompts - num_undefined prompts with a defined tau
    std_tau: float
    num_prompts: int  # prompts analysed
    num_undefined: int  # of those, prompts where tau is undefined (the metric or MI is constant over the ranks)
    pooled_tau: float  # one tau over all chosen images of all prompts


def scale_ranks(ranks: Sequence[int], m: int, reference_m: int = PAPER_M) -> list[int]:
    """Ranks given out of ``reference_m`` candidates as ranks out of ``m`` (same relative position)."""
    if m < 2:
        raise ValueError(f"MI ranks need at least 2 candidates per prompt, the round has M={m}")
    bad = [r for r in ranks if not 1 <= r <= reference_m]
    if bad or len(ranks) < 2:
        raise ValueError(f"ranks must be at least two values in [1, {reference_m}], got {list(ranks)}")
    scaled = sorted({1 + round((r - 1) * (m - 1) / max(reference_m - 1, 1)) for r in ranks})
    if len(scaled) < 2:
        raise ValueError(f"ranks {list(ranks)} of {reference_m} all map to rank {scaled[0]} of M={m}")
    return scaled


def by_prompt(rows: Sequence[dict[str, Any]], scores: Sequence[float], ranks: Sequence[int]) -> dict[str, dict[int, tuple[float, float]]]:
    """prompt -> MI rank -> (MI, score), for the wanted ranks only.

    MI ranks are recomputed from the ``mi`` column (1 = highest), not read from ``rank``: a round
    selected by another score (random, oracle controls) ranks its candidates by that score.
    """
    if len(rows) != len(scores):
        raise ValueError(f"got {len(scores)} scores for {len(rows)} images")
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, score in zip(rows, scores):
        pairs[row["prompt"]].append((float(row["mi"]), float(score)))
    table = {}
    for prompt, found in pairs.items():
        if len(found) < max(ranks):
            raise ValueError(f"prompt {prompt!r} has {len(found)} images; MI ranks {list(ranks)} need {max(ranks)}")
        mi_rank = rank_by_score(torch.tensor([mi for mi, _ in found], dtype=torch.float64)).tolist()
        table[prompt] = {r: found[i] for i, r in enumerate(mi_rank) if r in ranks}
    return table


def kendall_by_rank(rows: Sequence[dict[str, Any]], scores: Sequence[float], ranks: Sequence[int],
                    metric: str = "metric") -> KendallResult:
    """Kendall tau between MI and ``scores`` over each prompt's images at ``ranks`` (already on the round's M)."""
    table = by_prompt(rows, scores, ranks)
    taus = []
    for found in table.values():
        mi, score = zip(*(found[r] for r in sorted(found)))
        taus.append(kendalltau(mi, score).statistic)
    defined = np.array([t for t in taus if not math.isnan(t)])
    pooled = [pair for found in table.values() for pair in found.values()]
    pooled_tau = kendalltau(*zip(*pooled)).statistic
    return KendallResult(
        metric=metric, ranks=list(ranks),
        mean_tau=float(defined.mean()) if len(defined) else math.nan,
        std_tau=float(defined.std()) if len(defined) else math.nan,
        num_prompts=len(taus), num_undefined=len(taus) - len(defined), pooled_tau=float(pooled_tau),
    )


def score_cdfs(rows: Sequence[dict[str, Any]], scores: Sequence[float], ranks: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per MI rank: the sorted scores of the prompts' images at that rank and their empirical CDF."""
    table = by_prompt(rows, scores, ranks)
    cdfs = {}
    for r in ranks:
        values = np.sort([found[r][1] for found in table.values()])
        cdfs[r] = (values, np.arange(1, len(values) + 1) / len(values))
    return cdfs


def plot_cdfs(cdfs: dict[int, tuple[np.ndarray, np.ndarray]], metric: str, m: int) -> Figure:
    figure = Figure(figsize=(5, 3.5), layout="tight")
    ax = figure.subplots()
    for r, (values, cdf) in sorted(cdfs.items()):
        ax.step(values, cdf, where="post", label=f"MI rank {r} of {m}")
    ax.set(xlabel=f"{metric} score", ylabel="fraction of prompts", title=f"{metric} by MI rank", ylim=(0, 1.02))
    ax.legend()
    return figure


# ----------------------------------------------------------------------------- command line


def round_rows(round_dir: Path) -> list[dict[str, Any]]:
    """The round's candidates with an image (a pruned candidate has none, and a partial MI)."""
    return finished(RoundDir(round_dir).rows())


def scores_from_file(rows: Sequence[dict[str, Any]], path: Path, key: str) -> list[float]:
    """Per-image scores from a JSONL file with ``file_name`` and ``key`` (mitune.evaluate's scores.jsonl)."""
    found = {row["file_name"]: row[key] for row in read_jsonl(path) if key in row}
    missing = [row["file_name"] for row in rows if row["file_name"] not in found]
    if missing:
        raise ValueError(f"{path} has no {key!r} score for {len(missing)} image(s), e.g. {missing[0]}")
    return [float(found[row["file_name"]]) for row in rows]


def scores_from_metric(round_dir: Path, metric: AlignmentMetric) -> list[float]:
    images, prompts = load_image_folder(round_dir)
    return metric.score(images, prompts).tolist()


def analyse(round_dir: Path, scores: Sequence[float], metric: str, ranks: Sequence[int], out: Path,
            reference_m: int = PAPER_M) -> KendallResult:
    """Kendall tau (kendall_<metric>.json) and the CDF plot (cdf_<metric>.png) of one round."""
    rows = round_rows(round_dir)
    m = min(Counter(row["prompt"] for row in rows).values())
    scaled = scale_ranks(ranks, m, reference_m)
    result = kendall_by_rank(rows, scores, scaled, metric)
    write_json(out / f"kendall_{metric}.json", {**asdict(result), "round_dir": str(round_dir), "num_candidates": m})
    save_figure(out / f"cdf_{metric}.png", plot_cdfs(score_cdfs(rows, scores, scaled), metric, m), dpi=120)
    return result


def training_runs(path: Path) -> list[RunDir]:
    """``path`` itself when it is a training run, else the runs under it (a sweep dir)."""
    found = [RunDir(path)] if RunDir(path).rounds_dir.is_dir() else [
        RunDir(p.parent) for p in sorted(path.rglob("rounds")) if p.is_dir() and RunDir(p.parent).config_record.is_file()]
    if not found:
        raise FileNotFoundError(f"{path} is not a finished round (it has no {RoundDir(path).metadata.name}) and holds "
                                "no training run (a dir with rounds/ and a config record)")
    return found


def selection_table(path: Path, metric: str, kwargs: dict[str, Any], reference_m: int = PAPER_M) -> list[dict[str, Any]]:
    """Per run and round: the metric over the selected candidates vs all, and tau(MI, metric); the
    metric is built once (a model-based one loads its weights once for every round)."""
    scorer = build_alignment_metric(metric, **kwargs)
    table = []
    for run in training_runs(path):
        config = yaml.safe_load(run.config_record.read_text(encoding="utf-8"))
        r = 1
        while run.round(r).is_complete():
            round_dir = run.round(r)
            rows = finished(round_dir.rows())
            scores = scores_from_metric(round_dir.path, scorer)
            m = min(Counter(row["prompt"] for row in rows).values())
            chosen = [s for row, s in zip(rows, scores) if row["selected"]]
            table.append({
                "run": str(run.path), "selection": config["generation"]["selection"], "seed": config["seed"],
                "round": r, "metric": metric, "selected": float(np.mean(chosen)), "all": float(np.mean(scores)),
                "tau_mi": kendall_by_rank(rows, scores, range(1, m + 1), metric).mean_tau,
                "tau_mi_paper_ranks": kendall_by_rank(rows, scores, scale_ranks(PAPER_RANKS, m, reference_m),
                                                      metric).mean_tau,
            })
            r += 1
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mitune.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("round_dir", type=Path, help="a generation round (rounds/round_<r>) or evaluation image "
                        "folder; or training runs (a run dir or a sweep dir) for rounds.csv")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metric", nargs="+", help="metric(s) to score the images with (mitune.metrics names)")
    source.add_argument("--scores", type=Path, help="JSONL of per-image scores (file_name + --score-key)")
    parser.add_argument("--score-key", help="column of --scores to use (required with --scores)")
    parser.add_argument("--metric-kwargs", type=json.loads, default={}, help="JSON constructor arguments of --metric")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(PAPER_RANKS), help="MI ranks (default 1 25 50)")
    parser.add_argument("--reference-m", type=int, default=PAPER_M, help=f"M the ranks refer to (default: the paper's {PAPER_M})")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if not RoundDir(args.round_dir).metadata.is_file():
            if not args.metric:
                raise ValueError("training runs are scored with --metric")
            table = [row for metric in args.metric
                     for row in selection_table(args.round_dir, metric, args.metric_kwargs, args.reference_m)]
            write_text(args.out / "rounds.csv", csv_text(table, list(table[0])))
            print(args.out / "rounds.csv")
            return 0
        rows = round_rows(args.round_dir)
        if args.scores is not None:
            if not args.score_key:
                raise ValueError("--scores needs --score-key (the metric's column)")
            scored = {args.score_key: scores_from_file(rows, args.scores, args.score_key)}
        else:
            scored = {metric: scores_from_metric(args.round_dir, build_alignment_metric(metric, **args.metric_kwargs))
                      for metric in args.metric}
        results = [analyse(args.round_dir, scores, metric, args.ranks, args.out, args.reference_m)
                   for metric, scores in scored.items()]
    except (ValueError, OSError) as err:
        print(f"mitune.analysis: error: {err}", file=sys.stderr)
        return 1
    for result in results:
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
