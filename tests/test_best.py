"""``mitune.summary --dev``: each method's best (round, CFG) chosen on dev prompts, reported and contrasted on test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mitune import summary
from mitune.contrasts import COLUMNS
from tests.test_contrasts import IMAGES, PROMPTS, SEEDS, Score, category_of, write_job
from tests.test_summary import result

Point = tuple[str, int, float]  # (method or base, round, cfg)
# Dev and test disagree: on dev base is best at CFG 7.5 and mi at (R=2, CFG 3); on test at CFG 3 and (R=1, CFG 7.5).
DEV = {("base", 0, 3.0): 0.30, ("base", 0, 7.5): 0.40, ("mi", 1, 3.0): 0.50, ("mi", 1, 7.5): 0.55,
       ("mi", 2, 3.0): 0.70, ("mi", 2, 7.5): 0.60}
TEST = {("base", 0, 3.0): 0.45, ("base", 0, 7.5): 0.35, ("mi", 1, 3.0): 0.50, ("mi", 1, 7.5): 0.75,
        ("mi", 2, 3.0): 0.62, ("mi", 2, 7.5): 0.58}


def scores(level: float, salt: int, sd: float = 0.05) -> Score:
    """Around ``level``, with a training-seed and a prompt effect and noise per image."""
    return lambda s, p, j: float(level + 0.02 * s + 0.01 * (p % 5) + sd * np.random.default_rng([salt, s, p, j]).standard_normal())


def write_split(root: Path, levels: dict[Point, float], text: str, salt: int, sd: float = 0.05,
                missing: tuple[tuple[Point, int], ...] = ()) -> dict[Point, Score]:
    """Every point of ``levels`` for every seed (but the (point, seed) pairs ``missing``); each point's scores."""
    written = {}
    for i, (point, level) in enumerate(sorted(levels.items())):
        written[point] = scores(level, salt + i, sd)
        method, r, g = point
        for seed in SEEDS:
            if (point, seed) not in missing:
                write_job(root, "mi" if method == "base" else method, r, seed, written[point], cfg=g, text=text)
    return written


def job_mean(score: Score) -> float:
    """A point's value: each seed's mean over its images (the ``all`` row), averaged over the seeds."""
    return float(np.mean([[score(s, p, j) for p in range(PROMPTS) for j in range(IMAGES)] for s in SEEDS]))


def chosen(dev: Path, test: Path) -> dict[str, summary.Row]:
    rows = summary.best_points(summary.collect([dev]), summary.collect([test]), "toy_oracle")
    return {row["method"]: row for row in rows}


def test_each_method_is_reported_at_its_dev_best_point_not_at_its_test_best(tmp_path):
    on_dev = write_split(tmp_path / "dev", DEV, "dev prompt {}", salt=100)
    on_test = write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    best = chosen(tmp_path / "dev", tmp_path / "test")
    assert {m: (row["round"], row["cfg"]) for m, row in best.items()} == {"base": (0, 7.5), "mi": (2, 3.0)}
    # Chosen on the test prompts themselves (the paper's protocol), both rows would be others.
    on_itself = chosen(tmp_path / "test", tmp_path / "test")
    assert {m: (row["round"], row["cfg"]) for m, row in on_itself.items()} == {"base": (0, 3.0), "mi": (1, 7.5)}
    for method, point in (("base", ("base", 0, 7.5)), ("mi", ("mi", 2, 3.0))):
        assert best[method]["dev_value"] == pytest.approx(job_mean(on_dev[point]))
        assert best[method]["test_value"] == pytest.approx(job_mean(on_test[point]))  # not the test maximum
        assert best[method]["n_seeds"] == 3
    assert best["mi"]["test_value"] < on_itself["mi"]["test_value"] - 0.1


def test_a_point_missing_for_one_dev_seed_does_not_compete(tmp_path):
    levels = {**DEV, ("mi", 1, 7.5): 0.9}  # the highest dev point, when all its seeds are there
    write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    write_split(tmp_path / "full", levels, "dev prompt {}", salt=100)
    write_split(tmp_path / "gap", levels, "dev prompt {}", salt=100, missing=((("mi", 1, 7.5), 2),))
    full, gap = (chosen(tmp_path / dev, tmp_path / "test")["mi"] for dev in ("full", "gap"))
    assert (full["round"], full["cfg"]) == (1, 7.5)
    assert (gap["round"], gap["cfg"]) == (2, 3.0)


def test_ties_go_to_the_lower_round_then_the_lower_cfg(tmp_path):
    levels = {("base", 0, 3.0): 0.5, ("base", 0, 7.5): 0.5, ("mi", 1, 3.0): 0.4, ("mi", 1, 7.5): 0.6,
              ("mi", 2, 3.0): 0.6, ("mi", 2, 7.5): 0.6}
    write_split(tmp_path / "dev", levels, "dev prompt {}", salt=100, sd=0.0)
    write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    best = chosen(tmp_path / "dev", tmp_path / "test")
    assert best["mi"]["dev_value"] == pytest.approx(0.6 + 0.02 + 0.01 * np.mean([p % 5 for p in range(PROMPTS)]))
    assert {m: (row["round"], row["cfg"]) for m, row in best.items()} == {"base": (0, 3.0), "mi": (1, 7.5)}


def test_jobs_of_one_category_each_are_averaged_over_categories():
    """SD grids evaluate a category per job: a point's value is the mean over categories, not over their images."""
    rows = []
    for seed in ("1", "2"):
        for r, g, color, spatial in ((1, 3.0, 0.2, 0.8), (1, 7.5, 0.6, 0.5)):
            for category, value, n in (("color", color, 10), ("spatial", spatial, 30)):
                rows.append(dict(result("mitune", category, r, g, "clip_score", "alignment", value), n=n, train_seed=seed))
    parsed = [summary.parse_row({k: str(v) if v is not None else "" for k, v in row.items()}) for row in rows]
    [best] = summary.best_points(parsed, parsed, "clip_score")
    # Over images (n-weighted) CFG 3 would win: 0.65 > 0.525; over categories CFG 7.5: 0.55 > 0.5.
    assert (best["round"], best["cfg"], best["n_seeds"]) == (1, 7.5, 2)
    assert best["dev_value"] == pytest.approx(0.55)


def run(tmp_path: Path, *extra: str) -> int:
    return summary.main([str(tmp_path / "test"), "--dev", str(tmp_path / "dev"), "--out", str(tmp_path / "out"),
                         "--no-wandb", *extra])


def test_dev_prompts_that_are_test_prompts_are_refused(tmp_path, capsys):
    write_split(tmp_path / "dev", DEV, "prompt {}", salt=100)
    write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"{PROMPTS} dev prompt(s) are also test prompts, e.g. 'prompt 0'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_method_on_one_split_only_and_a_best_point_not_on_test_are_refused(tmp_path, capsys):
    write_split(tmp_path / "dev", {**DEV, ("random", 1, 7.5): 0.5}, "dev prompt {}", salt=100)
    write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    assert run(tmp_path) == 1
    assert "method 'random' is evaluated on the dev split only" in capsys.readouterr().err
    write_split(tmp_path / "dev2", DEV, "dev prompt {}", salt=100)
    write_split(tmp_path / "test2", {p: v for p, v in TEST.items() if p != ("mi", 2, 3.0)}, "prompt {}", salt=0)
    with pytest.raises(summary.SummaryError, match=r"^mi's best dev point \(round 2, CFG 3\) was not evaluated on the test"):
        chosen(tmp_path / "dev2", tmp_path / "test2")


def test_cli_writes_best_points_and_contrasts_between_them_on_test(tmp_path):
    write_split(tmp_path / "dev", DEV, "dev prompt {}", salt=100)
    on_test = write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    assert run(tmp_path, "--contrast", "mi-base") == 0
    out = tmp_path / "out"
    lines = (out / "best.csv").read_text().splitlines()
    assert lines[0] == "method,round,cfg,dev_value,test_value,n_seeds"
    assert [line.split(",")[:3] + line.split(",")[5:] for line in lines[1:]] == [["base", "0", "7.5", "3"],
                                                                                ["mi", "2", "3.0", "3"]]
    assert "| mi | 2 | 3 |" in (out / "best.md").read_text() and (out / "table1.csv").is_file()

    with open(out / "contrasts.csv", newline="") as f:
        rows = {row["category"]: row for row in csv.DictReader(f)}
    assert list(rows["all"]) == COLUMNS and set(rows) == {"all", "color", "shape"}
    assert {(row["round"], row["cfg"], row["n_seeds"]) for row in rows.values()} == {("best", "best", "3")}
    a, b = on_test[("mi", 2, 3.0)], on_test[("base", 0, 7.5)]  # each at its dev-chosen point, paired on test
    cells = {(s, p): np.mean([a(s, p, j) for j in range(IMAGES)]) - np.mean([b(s, p, j) for j in range(IMAGES)])
             for s in SEEDS for p in range(PROMPTS)}
    assert float(rows["all"]["mean_diff"]) == pytest.approx(np.mean(list(cells.values())))
    assert float(rows["color"]["mean_diff"]) == pytest.approx(np.mean([d for (_, p), d in cells.items()
                                                                       if category_of(p) == "color"]))
    assert float(rows["all"]["ci_low"]) < float(rows["all"]["mean_diff"]) < float(rows["all"]["ci_high"])
    assert "| mi-base | all | best (R=2 vs R=0) | 3 vs 7.5 |" in (out / "contrasts.md").read_text()


def test_best_points_are_logged_to_wandb_as_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_split(tmp_path / "dev", DEV, "dev prompt {}", salt=100)
    write_split(tmp_path / "test", TEST, "prompt {}", salt=0)
    out = tmp_path / "out"
    written = summary.summarize([tmp_path / "test"], out, dev=[tmp_path / "dev"])
    summary.log_to_wandb(written, out, "mitune")
    [table] = out.glob("wandb/offline-run-*/files/media/table/summary/best_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == summary.BEST_COLUMNS
    assert [row[:3] for row in logged["data"]] == [["base", 0, 7.5], ["mi", 2, 3.0]]
