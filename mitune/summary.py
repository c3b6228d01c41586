"""``python -m mitune.summary <sweep dir> [...] --out <dir>``: the paper's tables and trade-off plot.

Collects every ``results.csv`` that ``mitune.evaluate`` wrote under the given dirs (any number of
categories, runs and sweeps) and writes:

* ``table1.md`` / ``table1.csv``: alignment per category (columns) for the base model and each
  method/round (rows) at each requested CFG (Table 1 style), as mean ± std over the images, with
  their number n; where a point was evaluated for several seeds (training seed, evaluation seed),
  the mean over seeds ± the std across them. A job whose prompts span categories (the toy world)
  also gets an ``all`` column, pooled over its images;
* ``table2.md`` / ``table2.csv``: quality metrics (FID, FD-DINO, CMMD) per method/round, category
  and CFG (Table 2 style);
* ``tradeoff.png``: alignment (y, ± its standard error) against FID (x), one line per round across
  the CFG values (one marker per CFG), the base model as its own line, one panel per category
  (Figure 2 style);
* ``rounds.png``: alignment against round (0 = base), one line per method, one panel per CFG,
  ± the std across seeds (where there are several rounds);
* ``contrasts.csv`` / ``contrasts.md`` (with ``--contrast A-B ...``): paired differences per training
  seed and prompt from each job's ``scores.jsonl``, with crossed bootstrap CIs (``mitune.contrasts``);
* ``best.csv`` / ``best.md`` (with ``--dev <dirs>``): the paper picks each method's best (round, CFG) on
  the prompts it reports (a winner's curse); here each method's point (``base``: its CFG) is the
  highest mean of the contrast metric on the dev dirs' prompts, reported on the given (test) dirs'
  prompts, which must be disjoint from them. The mean is of the ``all`` row (each job's images
  pooled) or, where jobs have one category, over categories, averaged over training seeds; only
  points evaluated for every (training seed, category) the method has on dev compete; ties go to
  the lower round, then the lower CFG. ``contrasts.csv`` / ``.md`` then pair each side at its own
  best point on the test prompts (round and cfg ``best``);
* ``all_results.csv``: all rows collected (not named results.csv, so a later summary over a
  parent dir does not collect it again);

One summary compares methods on one base model: rows whose ``weights`` (the digest of the base model's
weight files, ``mitune.evaluate``) differ are refused, naming each digest and a job it comes from, since
their round-0 rows would be pooled as one "base" and every other row compared against it. Rows evaluated
before mitune recorded weights have none: they are pooled with the others, with one warning saying how many.

and logs the tables and the plot to W&B (offline without an API key; ``--no-wandb`` skips it).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mitune.contrasts import (BASE, COLUMNS as CONTRAST_COLUMNS, ContrastError, Job, best_contrast_table, contrast_table,
                              contrasts_markdown)
from mitune.runs.artifacts import RESULT_COLUMNS, RESULTS, SCORES
from mitune.runs.io import csv_text, read_jsonl, save_figure, write_text
from mitune.runs.tracking import setup_wandb

log = logging.getLogger(__name__)

Row = dict[str, Any]


class SummaryError(ValueError):
    """The result dirs hold nothing the requested tables can be made of."""


# ----------------------------------------------------------------------------- collecting


def parse_row(row: dict[str, str]) -> Row:
    return {**row, "round": int(row["round"]), "cfg": float(row["cfg"]), "value": float(row["value"]),
            "std": float(row["std"]) if row.get("std") else None, "n": int(row["n"]),
            "seed": row.get("seed", ""), "train_seed": row.get("train_seed") or "", "weights": row.get("weights") or ""}


def point_key(row: Row) -> tuple:
    """One measured point: round 0 is the base model whichever run it was evaluated from."""
    return (*model_key(row), row["category"], row["cfg"], row["metric"], row["seed"], row["train_seed"])


def pooled(rows: Sequence[Row]) -> Row:
    """The ``all`` row of one job's per-category alignment rows: mean and std over all their images."""
    n = sum(row["n"] for row in rows)
    mean = sum(row["n"] * row["value"] for row in rows) / n
    squares = sum((row["n"] - 1) * (row["std"] or 0.0) ** 2 + row["n"] * (row["value"] - mean) ** 2 for row in rows)
    return {**rows[0], "category": "all", "value": mean, "std": math.sqrt(squares / (n - 1)) if n > 1 else 0.0, "n": n,
            "num_prompts": sum(int(row["num_prompts"]) for row in rows)}


def with_all(rows: list[Row]) -> list[Row]:
    """``rows`` plus an ``all`` row per job and alignment metric whose rows span several categories."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        if row["kind"] == "alignment":
            groups[(row.get("image_dir", ""), row["metric"])].append(row)
    return rows + [pooled(group) for group in groups.values() if len({row["category"] for row in group}) > 1]


def result_files(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every results.csv under ``dirs`` (or the CSV files given)."""
    files = []
    for d in dirs:
        path = Path(d).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"results dir {path} does not exist")
        files += [path] if path.is_file() else sorted(path.rglob(RESULTS))
    empty = [file for file in files if file.stat().st_size == 0]
    for file in empty:
        log.warning("%s is empty (0 bytes): left out; rerun the evaluation that wrote it", file)
    files = [file for file in files if file not in empty]
    if not files:
        raise SummaryError(f"no {RESULTS} under {', '.join(map(str, dirs))}; run `python -m mitune.evaluate` first")
    return files


def read_results(file: Path) -> list[Row]:
    """A results table's rows; a damaged one (a row cut short, a value that is not a number) is an error naming
    the file and line."""
    rows = []
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            try:
                if None in row.values() or None in row:  # fewer or more fields than the header
                    raise ValueError(f"{len(reader.fieldnames or [])} columns expected")
                rows.append(parse_row(row))
            except (ValueError, TypeError, KeyError) as err:
                raise SummaryError(f"{file}, line {reader.line_num}: damaged row ({type(err).__name__}: {err}); "
                                   "rerun the evaluation that wrote it, or remove the file") from None
    return rows


def collect(dirs: Sequence[str | os.PathLike]) -> list[Row]:
    """Rows of every results.csv under ``dirs``, all of one base model (``check_weights``); a point evaluated
    twice keeps its newest result."""
    found = [(file.stat().st_mtime, row) for file in result_files(dirs) for row in with_all(read_results(file))]
    check_weights([row for _, row in found])
    newest: dict[tuple, tuple[float, Row]] = {}
    for mtime, row in found:
        key = point_key(row)
        if key in newest and newest[key][1]["value"] != row["value"]:
            log.warning("%s evaluated more than once with different results; keeping the newest", key)
        if key not in newest or mtime >= newest[key][0]:
            newest[key] = (mtime, row)
    return [row for _, row in newest.values()]


def check_weights(rows: Sequence[Row]) -> None:
    """Refuse rows of different base weights (one summary, one base model); warn once where rows without a
    recorded digest are pooled with rows that have one."""
    found: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        found[row["weights"]].append(row)
    unknown = found.pop("", [])
    if len(found) > 1:
        raise SummaryError("results of different base weights in one summary (their round 0 would be one base row, "
                           "every method compared with it): " + "; ".join(
            f"weights {digest} ({len(group)} rows, e.g. {group[0].get('image_dir') or group[0].get('run_dir')})"
            for digest, group in sorted(found.items())) + "; summarize each base model's results separately")
    if found and unknown:
        log.warning("%d result rows have no weights digest (evaluated before mitune recorded it): pooled with the "
                    "rows of weights %s as if of the same base model", len(unknown), next(iter(found)))


def scored_jobs(files: Sequence[Path]) -> list[Job]:
    """Each job's point and its per-image scores; as in ``collect``, a point evaluated twice (round 0
    from every run of a seed) keeps its newest job. Jobs without scores.jsonl are skipped with a warning."""
    newest: dict[tuple, tuple[float, Job]] = {}
    unscored = []
    for file in files:
        rows = [row for row in read_results(file) if row["kind"] == "alignment"]
        if not rows:
            continue
        if not (file.parent / SCORES).is_file():
            unscored.append(str(file.parent))
            continue
        row, categories = rows[0], {row["category"] for row in rows}
        method, r = model_key(row)
        job = Job(method or BASE, r, row["cfg"], row["train_seed"], file.parent / SCORES,
                  next(iter(categories)) if len(categories) == 1 else None)
        key, mtime = (method, r, row["cfg"], row["seed"], row["train_seed"]), file.stat().st_mtime
        if key not in newest or mtime >= newest[key][0]:
            newest[key] = (mtime, job)
    if unscored:
        log.warning("no %s in %s: left out of the paired contrasts", SCORES, ", ".join(unscored))
    return [job for _, job in newest.values()]


def seed_means(rows: Sequence[Row]) -> list[Row]:
    """One row per (model, category, cfg, metric): with several seeds, the mean over them, the std
    across them and all their images as n; with one, the row itself (std across its images)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[point_key(row)[:-2]].append(row)
    out = []
    for group in groups.values():
        values = [row["value"] for row in group]
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        out.append({**group[0], "value": mean, "std": group[0]["std"] if spread is None else spread,
                    "n": sum(row["n"] for row in group), "seeds": len(group)})
    return out


# ----------------------------------------------------------------------------- tables


def label(method: str, r: int) -> str:
    """Row label: round 0 is the base model whatever run it was evaluated from."""
    return "base" if r == 0 else f"{method} R={r}"


def model_order(rows: Sequence[Row]) -> list[tuple[str, int]]:
    """(method, round) pairs: the base model first, then each method's rounds in order."""
    pairs = {(row["method"], row["round"]) for row in rows}
    base = [("", 0)] if any(r == 0 for _, r in pairs) else []
    return base + sorted((m, r) for m, r in pairs if r > 0)


def model_key(row: Row) -> tuple[str, int]:
    return ("", 0) if row["round"] == 0 else (row["method"], row["round"])


def alignment_columns(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(category, metric) per column; the column is named by the category alone when it has one metric."""
    return sorted({(row["category"], row["metric"]) for row in rows if row["kind"] == "alignment"},
                  key=lambda column: (column[0] == "all", column))


def plotted_metric(rows: Sequence[Row]) -> dict[str, str]:
    """The alignment metric each category is plotted with: its first (alphabetically) when it has several."""
    chosen: dict[str, str] = {}
    for category, metric in alignment_columns(rows):
        chosen.setdefault(category, metric)
    return chosen


def column_name(category: str, metric: str, columns: Sequence[tuple[str, str]]) -> str:
    return category if sum(c == category for c, _ in columns) == 1 else f"{category}/{metric}"


STATS = ("", "_std", "_n")  # each Table 1 column: the mean, its std over images and their number


def table1(rows: Sequence[Row], cfg: float) -> tuple[list[str], list[list[Any]]]:
    """Alignment per category at one CFG: header and body, each column as (mean, std, n) over the images
    (None where a point was not evaluated)."""
    at_cfg = alignment_at(rows, cfg)
    if not at_cfg:
        found = sorted({row["cfg"] for row in rows if row["kind"] == "alignment"})
        raise SummaryError(f"no alignment results at CFG {cfg:g}; evaluated CFGs: {found}")
    columns = alignment_columns(at_cfg)
    point = {(model_key(row), row["category"], row["metric"]): row for row in at_cfg}
    seeds = seed_counts(at_cfg)
    mixed = len(set(seeds.values())) > 1  # then each label says its number of seeds
    header = ["model", "method", "round"] + [column_name(c, m, columns) + s for c, m in columns for s in STATS]
    body = [[label(m, r) + (f" ({seeds[(m, r)]} seed{'s' * (seeds[(m, r)] > 1)})" if mixed else ""), m or "base", r]
            + [stat for c, metric in columns for stat in stats(point.get(((m, r), c, metric)))]
            for m, r in model_order(at_cfg)]
    return header, body


def alignment_at(rows: Sequence[Row], cfg: float) -> list[Row]:
    return [row for row in rows if row["kind"] == "alignment" and math.isclose(row["cfg"], cfg)]


def seed_counts(rows: Sequence[Row]) -> dict[tuple[str, int], int]:
    """How many training seeds each model's (seed-averaged) rows come from; 1 for a single run's row."""
    return {model_key(row): row.get("seeds", 1) for row in rows}


def seed_spread(rows: Sequence[Row]) -> str:
    """What a Table 1 cell's ± is: the std across seeds, or over images where every model has one seed."""
    counts = set(seed_counts(rows).values())
    if counts == {1}:
        return "mean ± std over images"
    if len(counts) == 1:
        return f"mean ± std across {counts.pop()} seeds"
    return "mean ± std across the seeds each row's label gives"


def stats(row: Row | None) -> tuple[Any, Any, Any]:
    return (row["value"], row["std"], row["n"]) if row else (None, None, None)


def mean_pm_std(header: Sequence[str], body: Sequence[Sequence[Any]]) -> tuple[str, list[str], list[list[Any]]]:
    """Table 1 for reading: "mean ± std" cells, and a note giving n when every cell has the same (else each cell does)."""
    first = 3  # model, method, round; then a (mean, std, n) triple per column

    def triples(row: Sequence[Any]) -> list[Sequence[Any]]:
        return [row[i:i + 3] for i in range(first, len(header), 3)]

    counts = {n for row in body for mean, _, n in triples(row) if mean is not None}
    same_n = len(counts) == 1

    def cell(mean: Any, std: Any, n: Any) -> str:
        if mean is None:
            return "-"
        text = fmt(mean) + (f" ± {std:.2g}" if std is not None else "")
        return text if same_n else f"{text} (n={n})"

    note = f"n = {next(iter(counts))} images per cell" if same_n else "n images per cell"
    return note, list(header[:first]) + list(header[first::3]), [list(row[:first]) + [cell(*t) for t in triples(row)]
                                                                 for row in body]


def table2(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """Quality metrics per model, category and CFG."""
    quality = [row for row in rows if row["kind"] == "quality"]
    if not quality:
        raise SummaryError("no quality results (FID/FD-DINO/CMMD); evaluate with eval.quality=[...] eval.reference=...")
    metrics = sorted({row["metric"] for row in quality})
    value = {(model_key(row), row["category"], row["cfg"], row["metric"]): row["value"] for row in quality}
    points = sorted({(row["category"], row["cfg"]) for row in quality})
    header = ["model", "method", "round", "category", "cfg"] + metrics
    body = [[label(m, r), m or "base", r, c, g] + [value.get(((m, r), c, g, metric)) for metric in metrics]
            for m, r in model_order(quality) for c, g in points
            if any(((m, r), c, g, metric) in value for metric in metrics)]
    return header, body


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(title: str, header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = [f"{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def table_csv(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    return csv_text([dict(zip(header, ("" if v is None else v for v in row))) for row in body], header)


# ----------------------------------------------------------------------------- trade-off plot


Point = tuple[float, float, float, float]  # (cfg, quality, alignment mean, its standard error)
MARKERS = "osD^vP*Xhp"


def tradeoff_series(rows: Sequence[Row], quality: str) -> dict[str, dict[tuple[str, int], list[Point]]]:
    """Per category: per (method, round), the points that have both metrics."""
    first_metric = plotted_metric(rows)
    fid, align = {}, {}
    for row in rows:
        key = (row["category"], model_key(row), row["cfg"])
        if row["metric"] == quality:
            fid[key] = row["value"]
        elif row["kind"] == "alignment" and row["metric"] == first_metric.get(row["category"]):
            align[key] = (row["value"], (row["std"] or 0.0) / math.sqrt(row["n"]))
    series: dict[str, dict[tuple[str, int], list[Point]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(fid.keys() & align.keys()):
        category, model, cfg = key
        series[category][model].append((cfg, fid[key], *align[key]))
    return {c: dict(s) for c, s in series.items()}


TRADEOFF_COLUMNS = ["category", "model", "method", "round", "cfg", "alignment_metric", "alignment", "alignment_se",
                    "quality_metric", "quality"]


def tradeoff_rows(rows: Sequence[Row], quality: str) -> list[Row]:
    """The trade-off plot's points as a table (``tradeoff.csv``; W&B's interactive chart): one per category,
    (method, round) and CFG."""
    metric_of = plotted_metric(rows)
    return [{"category": category, "model": label(method, r), "method": method or "base", "round": r, "cfg": cfg,
             "alignment_metric": metric_of[category], "alignment": y, "alignment_se": error,
             "quality_metric": quality, "quality": x}
            for category, lines in sorted(tradeoff_series(rows, quality).items())
            for (method, r), points in sorted(lines.items()) for cfg, x, y, error in points]


def plot_tradeoff(rows: Sequence[Row], quality: str) -> Figure:
    """One panel per category: a line per model (colour) across CFG (marker), alignment ± 1 standard error."""
    series = tradeoff_series(rows, quality)
    if not series:
        raise SummaryError(f"no category has both an alignment metric and {quality} at the same points; "
                           f"evaluate with eval.quality=[{quality}] eval.reference=<folder>")
    figure = Figure(figsize=(4.8 * len(series), 4.2), layout="constrained")
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    metric_of = plotted_metric(rows)
    cfgs = sorted({cfg for lines in series.values() for points in lines.values() for cfg, *_ in points})
    marker = {cfg: MARKERS[i % len(MARKERS)] for i, cfg in enumerate(cfgs)}
    for ax, (category, lines) in zip(axes, sorted(series.items())):
        for i, ((method, r), points) in enumerate(sorted(lines.items())):
            color = "black" if r == 0 else f"C{i}"
            _, xs, ys, errors = zip(*points)
            ax.plot(xs, ys, color=color, linestyle="--" if r == 0 else "-", label=label(method, r))
            for cfg, x, y, error in points:
                ax.errorbar(x, y, yerr=error, color=color, marker=marker[cfg], capsize=3)
        ax.set(xlabel=f"{quality} (lower is better)", ylabel=f"{metric_of[category]} (higher is better, ± s.e.)",
               title=f"{category}: alignment vs {quality} over CFG")
        ax.legend(fontsize=8, loc="best")
    handles = [Line2D([], [], color="0.4", marker=marker[cfg], linestyle="", label=f"CFG {cfg:g}") for cfg in cfgs]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(cfgs), fontsize=8)
    return figure


def plot_rounds(means: Sequence[Row]) -> Figure:
    """Alignment against round (0 = the base model), a line per method, a panel per CFG; the
    ``all`` column where there is one, else each category's plotted metric, ± the std across seeds."""
    metric_of = plotted_metric(means)
    category = "all" if "all" in metric_of else None
    cfgs = sorted({row["cfg"] for row in means if row["kind"] == "alignment"})
    figure = Figure(figsize=(4.5 * len(cfgs), 3.6), layout="constrained")
    axes = figure.subplots(1, len(cfgs), squeeze=False, sharey=True)[0]
    for ax, g in zip(axes, cfgs):
        points = [row for row in means if row["kind"] == "alignment" and math.isclose(row["cfg"], g)
                  and row["metric"] == metric_of[row["category"]] and (category is None or row["category"] == category)]
        base = [row for row in points if row["round"] == 0]
        for i, (method, cat) in enumerate(sorted({(row["method"], row["category"]) for row in points if row["round"]})):
            line = [b for b in base if b["category"] == cat] + sorted(
                (row for row in points if (row["method"], row["category"]) == (method, cat) and row["round"]),
                key=lambda row: row["round"])
            ax.errorbar([row["round"] for row in line], [row["value"] for row in line],
                        yerr=[row["std"] if row["seeds"] > 1 else 0.0 for row in line], marker="o", capsize=3,
                        color=f"C{i}", label=method if category else f"{method} ({cat})")
        ax.set(title=f"CFG {g:g}", xlabel="round R (0 = base)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel(f"{metric_of[category] if category else 'alignment'}" + (" (all categories)" if category else ""))
    axes[-1].legend(fontsize=8)
    return figure


# ----------------------------------------------------------------------------- main


def default_quality(rows: Sequence[Row], wanted: str) -> str:
    """The quality metric for the plot: ``wanted`` when evaluated, else the only one there is."""
    found = sorted({row["metric"] for row in rows if row["kind"] == "quality"})
    if wanted in found or len(found) != 1:
        return wanted
    log.warning("no %s results; plotting against %s", wanted, found[0])
    return found[0]


BEST_COLUMNS = ["method", "round", "cfg", "dev_value", "test_value", "n_seeds"]
Cells = dict[tuple[str, str], float]  # (training seed, category) -> value, averaged over evaluation seeds


def default_metric(rows: Sequence[Row], metric: str | None) -> str:
    """The contrasts' (and the best points') metric: ``metric``, else the alphabetically first alignment one (plotted)."""
    found = {row["metric"] for row in rows if row["kind"] == "alignment"}
    if not found:
        raise SummaryError("no alignment results to contrast or to choose best points by")
    return metric or min(found)


def point_cells(rows: Sequence[Row], metric: str) -> dict[tuple[str, int, float], Cells]:
    """Per point (method or base, round, cfg): ``metric`` per (training seed, category); only the ``all`` rows
    for a method whose jobs span categories (the toy), each category for one whose jobs have one (SD)."""
    groups: dict[tuple[str, int, float], dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["kind"] == "alignment" and row["metric"] == metric:
            method, r = model_key(row)
            groups[(method or BASE, r, row["cfg"])][(row["train_seed"], row["category"])].append(row["value"])
    spans = {point[0] for point, cells in groups.items() if any(c == "all" for _, c in cells)}
    return {point: {cell: sum(v) / len(v) for cell, v in cells.items() if (cell[1] == "all") == (point[0] in spans)}
            for point, cells in groups.items()}


def point_value(cells: Cells) -> tuple[float, int]:
    """The mean over training seeds of each seed's mean over categories, and the number of seeds."""
    by_seed: dict[str, list[float]] = defaultdict(list)
    for (seed, _), value in cells.items():
        by_seed[seed].append(value)
    return sum(sum(v) / len(v) for v in by_seed.values()) / len(by_seed), len(by_seed)


def best_points(dev: Sequence[Row], test: Sequence[Row], metric: str) -> list[Row]:
    """Each method's (``BEST_COLUMNS``) point of highest dev mean among those complete on dev, with its test mean."""
    on_dev, on_test = point_cells(dev, metric), point_cells(test, metric)
    methods, tested = {m for m, _, _ in on_dev}, {m for m, _, _ in on_test}
    if not methods:
        raise SummaryError(f"no {metric!r} alignment results in the dev dirs")
    if methods != tested:
        one = min(methods ^ tested)
        raise SummaryError(f"method {one!r} is evaluated on the {'dev' if one in methods else 'test'} split only; "
                           "each method needs both to choose its point on dev and report it on test")
    best = []
    for method in sorted(methods):
        mine = {point: cells for point, cells in on_dev.items() if point[0] == method}
        needed = set().union(*mine.values())
        complete = {point: point_value(cells)[0] for point, cells in mine.items() if cells.keys() == needed}
        if not complete:
            raise SummaryError(f"no point of {method} on dev was evaluated for all its training seeds and categories "
                               f"({', '.join(sorted(f'{s}/{c}' for s, c in needed))}); evaluate one grid per seed")
        (_, r, g), dev_value = max(complete.items(), key=lambda item: (item[1], -item[0][1], -item[0][2]))
        if (method, r, g) not in on_test:
            raise SummaryError(f"{method}'s best dev point (round {r}, CFG {g:g}) was not evaluated on the test split")
        test_value, seeds = point_value(on_test[(method, r, g)])
        best.append({"method": method, "round": r, "cfg": g, "dev_value": dev_value, "test_value": test_value,
                     "n_seeds": seeds})
    return best


def check_disjoint(dev: Sequence[Path], test: Sequence[Path]) -> None:
    """Refuse dev and test evaluations that share a prompt (by its text, from each job's scores.jsonl)."""
    dev_prompts, test_prompts = ({row["prompt"] for job in scored_jobs(files) for row in read_jsonl(job.scores)}
                                 for files in (dev, test))
    for split, prompts in (("dev", dev_prompts), ("test", test_prompts)):
        if not prompts:
            raise SummaryError(f"no {SCORES} in the {split} dirs: the dev and test prompts cannot be checked disjoint")
    shared = dev_prompts & test_prompts
    if shared:
        raise SummaryError(f"{len(shared)} dev prompt(s) are also test prompts, e.g. {min(shared)!r}: a point chosen on "
                           "dev is reported on test only when their prompts are disjoint")


def best_markdown(best: Sequence[Row], metric: str) -> str:
    body = [[row["method"], row["round"], row["cfg"], row["dev_value"], row["test_value"], row["n_seeds"]] for row in best]
    return markdown(f"Each method's best (round, CFG) by the dev mean of {metric} (each job's `all` row, or the mean over "
                    "categories where a job has one; mean over training seeds; only points of every dev seed compete; "
                    "ties: lower round, then lower CFG), and its mean on the disjoint test prompts",
                    ["method", "round", "CFG", "dev", "test", "seeds (test)"], body)


def write_contrasts(dirs: Sequence[str | os.PathLike], out: Path, contrasts: Sequence[str], metric: str,
                    best: dict[str, tuple[int, float]] | None = None) -> dict[str, Path]:
    """contrasts.csv / contrasts.md (mitune.contrasts) of ``metric``, at every point or, given ``best``, each side
    at its best point; nothing where no contrast has a pair."""
    jobs = scored_jobs(result_files(dirs))
    table = contrast_table(jobs, metric, contrasts) if best is None else best_contrast_table(jobs, metric, contrasts, best)
    if not table:
        log.warning("no paired contrasts: no (seed, prompt) cell of %s was evaluated on both sides", ", ".join(contrasts))
        return {}
    write_text(out / "contrasts.csv", csv_text(table, CONTRAST_COLUMNS))
    write_text(out / "contrasts.md", contrasts_markdown(table, metric, best))
    return {"contrasts_csv": out / "contrasts.csv", "contrasts_md": out / "contrasts.md"}


def summarize(dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, cfg: float | Sequence[float] = 7.5,
              quality: str = "fid", contrasts: Sequence[str] = (), contrast_metric: str | None = None,
              dev: Sequence[str | os.PathLike] = ()) -> dict[str, Path]:
    """Write the tables, the plots and the collected rows into ``out``; returns the written files. With ``dev``
    dirs, ``dirs`` are the test split and each method's point is chosen on ``dev`` (best.csv)."""
    rows = collect(dirs)
    means = seed_means(rows)
    out = Path(out).expanduser()
    metric = default_metric(rows, contrast_metric) if dev or contrasts else ""
    best = None
    if dev:
        dev_rows = collect(dev)
        check_weights([*rows, *dev_rows])
        check_disjoint(result_files(dev), result_files(dirs))
        best = best_points(dev_rows, rows, metric)
    written = {"results": out / "all_results.csv"}
    key = lambda r: tuple(str(r[c]) for c in RESULT_COLUMNS)  # noqa: E731
    write_text(written["results"], csv_text(sorted(rows, key=key), RESULT_COLUMNS))
    shown = [cfg] if isinstance(cfg, (int, float)) else list(cfg)
    evaluated = sorted({row["cfg"] for row in means if row["kind"] == "alignment"})
    sections = [f"CFG shown: {', '.join(f'{g:g}' for g in shown)} (evaluated: {', '.join(f'{g:g}' for g in evaluated)}; "
                "`--cfg` picks others; table2 and the trade-off plot show every evaluated CFG)\n"]
    csv_rows, csv_header = [], []
    for g in shown:
        header, body = table1(means, g)
        note, md_header, md_body = mean_pm_std(header, body)
        spread = seed_spread(alignment_at(means, g))
        metrics = ", ".join(sorted({metric for _, metric in alignment_columns(means)}))
        sections.append(markdown(f"Table 1 style: alignment at CFG {g:g} ({spread}, {note}; metric: {metrics})",
                                 md_header, md_body))
        csv_header = header[:3] + ["cfg"] + header[3:]
        csv_rows += [row[:3] + [g] + row[3:] for row in body]
    write_text(out / "table1.md", "\n".join(sections))
    write_text(out / "table1.csv", table_csv(csv_header, csv_rows))
    written.update(table1_md=out / "table1.md", table1_csv=out / "table1.csv")
    if len({row["round"] for row in means}) > 1:
        save_figure(out / "rounds.png", plot_rounds(means), dpi=120)
        written["rounds"] = out / "rounds.png"
    if best is not None:
        write_text(out / "best.csv", csv_text(best, BEST_COLUMNS))
        write_text(out / "best.md", best_markdown(best, metric))
        written.update(best_csv=out / "best.csv", best_md=out / "best.md")
    if contrasts:
        points = None if best is None else {row["method"]: (row["round"], row["cfg"]) for row in best}
        written.update(write_contrasts(dirs, out, contrasts, metric, points))
    try:
        header, body = table2(means)
    except SummaryError as err:
        log.warning("no Table 2 and no trade-off plot: %s", err)
        return written
    write_text(out / "table2.md", markdown("Table 2 style: image quality (lower is better) at every evaluated CFG",
                                           header, body))
    write_text(out / "table2.csv", table_csv(header, body))
    plotted = default_quality(means, quality)
    save_figure(out / "tradeoff.png", plot_tradeoff(means, plotted), dpi=120)
    write_text(out / "tradeoff.csv", csv_text(tradeoff_rows(means, plotted), TRADEOFF_COLUMNS))
    written.update(table2_md=out / "table2.md", table2_csv=out / "table2.csv", tradeoff=out / "tradeoff.png",
                   tradeoff_csv=out / "tradeoff.csv")
    return written


def read_csv_rows(path: Path) -> tuple[list[str], list[list[Any]]]:
    """A CSV's header and rows, numbers as floats (W&B charts need numeric columns)."""
    def value(text: str) -> Any:
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="", encoding="utf-8") as f:
        reader = list(csv.reader(f))
    return reader[0], [[value(v) for v in row] for row in reader[1:]]


def log_to_wandb(written: dict[str, Path], out: Path, project: str) -> str:
    """The tables as W&B tables, the plot as an image and the trade-off as interactive scatter charts (alignment
    against quality, one point per (model, CFG); one chart per category and the table behind them), in a
    "summary" run. Returns the line saying where the run is."""
    import wandb

    from mitune.runs.tracking import wandb_summary

    setup_wandb()
    run = wandb.init(project=project, job_type="summary", name=f"summary-{out.name}", dir=str(out))
    try:
        where = wandb_summary(run)
        for name in ("table1_csv", "table2_csv", "contrasts_csv", "best_csv"):
            if name in written:
                columns, data = read_csv_rows(written[name])
                run.log({f"summary/{name[:-4]}": wandb.Table(columns=columns, data=data)})
        if "tradeoff" in written:
            run.log({"summary/tradeoff": wandb.Image(str(written["tradeoff"]))})
            columns, data = read_csv_rows(written["tradeoff_csv"])
            table = wandb.Table(columns=columns, data=data)
            charts = {"summary/tradeoff_points": table}
            index = columns.index("category")
            for category in dict.fromkeys(row[index] for row in data):
                mine = [row for row in data if row[index] == category]
                charts[f"summary/tradeoff_{category}"] = wandb.plot.scatter(
                    wandb.Table(columns=columns, data=mine), x="quality", y="alignment",
                    title=f"{category}: {mine[0][columns.index('alignment_metric')]} vs "
                          f"{mine[0][columns.index('quality_metric')]}, one point per (round, CFG)")
            run.log(charts)
    finally:
        wandb.finish()
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mitune.summary", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="evaluation sweep/run dirs (searched for results.csv) or CSV files")
    parser.add_argument("--out", required=True, help="folder for the tables and the plot")
    parser.add_argument("--cfg", type=float, nargs="+", default=[7.5], help="CFG(s) of Table 1 (default 7.5)")
    parser.add_argument("--quality", default="fid", help="quality metric on the plot's x axis (default fid)")
    parser.add_argument("--contrast", nargs="+", default=[], metavar="A-B",
                        help="paired contrasts with bootstrap CIs, e.g. mi-random mi-base (base: round 0); default none")
    parser.add_argument("--contrast-metric", help="alignment metric of the contrasts and of --dev's choice "
                                                  "(default: the first, as plotted)")
    parser.add_argument("--dev", nargs="+", default=[], metavar="DIR",
                        help="evaluation dirs of dev prompts: each method's best (round, CFG) is chosen on them and "
                             "reported on the (test) dirs, best.csv; contrasts then at the best points")
    parser.add_argument("--project", default="mitune", help="W&B project")
    parser.add_argument("--no-wandb", dest="wandb", action="store_false", help="do not log to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = summarize(args.dirs, args.out, cfg=args.cfg, quality=args.quality, contrasts=args.contrast,
                            contrast_metric=args.contrast_metric, dev=args.dev)
    except (SummaryError, ContrastError, OSError) as err:
        print(f"mitune.summary: error: {err}", file=sys.stderr)
        return 1
    for path in written.values():
        print(path)
    if args.wandb:
        print(log_to_wandb(written, Path(args.out), args.project))
    return 0


if __name__ == "__main__":
    sys.exit(main())
