"""Paired contrasts with bootstrap CIs (mitune.contrasts via mitune.summary), on synthetic evaluation jobs."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mitune import summary
from mitune.contrasts import COLUMNS, ContrastError, contrast_table, crossed_bootstrap
from mitune.runs.artifacts import RESULT_COLUMNS
from mitune.runs.io import csv_text

SEEDS = (0, 1, 2)
PROMPTS = 12
IMAGES = 3
Score = Callable[[int, int, int], float]  # (seed, prompt_id, image) -> the image's score


def category_of(prompt_id: int) -> str:
    return "color" if prompt_id < PROMPTS // 2 else "shape"


def write_job(root: Path, method: str, r: int, seed: int, score: Score, cfg: float = 7.5, train_seed: int | None = None,
              with_category: bool = True, text: str = "prompt {}") -> None:
    """One evaluation job as mitune.evaluate writes it: results.csv and scores.jsonl (``metric`` toy_oracle);
    ``text``: each prompt's text from its id."""
    job = root / f"{method}-seed{seed}" / f"round_{r}-cfg_{cfg}"
    job.mkdir(parents=True)
    images = [{"file_name": f"images/{p:06d}_{j:03d}.png", "prompt": text.format(p), "prompt_id": p, "candidate": j,
               "seed": seed, "mi": 0.0, "toy_oracle": score(seed, p, j),
               **({"category": category_of(p)} if with_category else {})} for p in range(PROMPTS) for j in range(IMAGES)]
    (job / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in images))
    rows = []
    for category in ("color", "shape"):
        values = [row["toy_oracle"] for row in images if category_of(row["prompt_id"]) == category]
        rows.append({"method": method, "category": category, "round": r, "cfg": cfg, "metric": "toy_oracle",
                     "kind": "alignment", "value": np.mean(values), "std": np.std(values, ddof=1), "n": len(values),
                     "num_prompts": PROMPTS // 2, "images_per_prompt": IMAGES, "seed": seed,
                     "train_seed": seed if train_seed is None else train_seed, "model": "toy", "run_dir": "",
                     "image_dir": f"images/round_{r}/seed{seed}"})
    (job / "results.csv").write_text(csv_text(rows, RESULT_COLUMNS))


def noisy(mean: Callable[[int, int], float], sd: float, salt: int) -> Score:
    """Scores around ``mean(seed, prompt)`` with independent noise per image (``salt``: another draw)."""
    return lambda s, p, j: float(mean(s, p) + sd * np.random.default_rng([salt, s, p, j]).standard_normal())


def shared(sd: float) -> Callable[[int, int], float]:
    """An effect per (seed, prompt) that both sides share: the evaluation noise of a seed, the prompt's difficulty."""
    return lambda s, p: 0.4 + sd * float(np.random.default_rng([99, s, p]).standard_normal())


def table(root: Path, *contrasts: str) -> dict[tuple[str, str, int, float], dict]:
    rows = contrast_table(summary.scored_jobs(summary.result_files([root])), "toy_oracle", contrasts)
    return {(row["contrast"], row["category"], row["round"], row["cfg"]): row for row in rows}


def two_methods(root: Path, a: Score, b: Score, rounds: tuple[int, ...] = (1,)) -> None:
    for seed in SEEDS:
        for r in rounds:
            write_job(root, "mi", r, seed, a)
            write_job(root, "random", r, seed, b)


def test_a_known_margin_on_every_prompt_is_found_and_excludes_zero(tmp_path):
    base = shared(0.1)
    two_methods(tmp_path, noisy(lambda s, p: base(s, p) + 0.2, 0.05, 1), noisy(base, 0.05, 2))
    row = table(tmp_path, "mi-random")[("mi-random", "all", 1, 7.5)]
    assert (row["n_prompts"], row["n_seeds"]) == (PROMPTS, 3)
    assert 0 < row["ci_low"] < 0.2 < row["ci_high"]
    cells = [np.mean([noisy(lambda s, p: base(s, p) + 0.2, 0.05, 1)(s, p, j) - noisy(base, 0.05, 2)(s, p, j)
                      for j in range(IMAGES)]) for s in SEEDS for p in range(PROMPTS)]
    assert row["mean_diff"] == pytest.approx(np.mean(cells))


def test_the_same_distribution_gives_an_interval_around_zero(tmp_path):
    base = shared(0.1)
    two_methods(tmp_path, noisy(base, 0.1, 1), noisy(base, 0.1, 2))
    row = table(tmp_path, "mi-random")[("mi-random", "all", 1, 7.5)]
    assert row["ci_low"] < 0 < row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.2


def test_each_category_has_its_own_row(tmp_path):
    base = shared(0.1)
    two_methods(tmp_path, noisy(lambda s, p: base(s, p) + 0.3 * (category_of(p) == "color"), 0.05, 1), noisy(base, 0.05, 2))
    rows = table(tmp_path, "mi-random")
    assert [key[1] for key in rows] == ["all", "color", "shape"]
    color, shape, pooled = (rows[("mi-random", c, 1, 7.5)] for c in ("color", "shape", "all"))
    assert 0 < color["ci_low"] < 0.3 < color["ci_high"] and color["n_prompts"] == PROMPTS // 2
    assert shape["ci_low"] < 0 < shape["ci_high"]
    assert pooled["mean_diff"] == pytest.approx((color["mean_diff"] + shape["mean_diff"]) / 2)


def test_pairs_are_made_by_seed_and_prompt(tmp_path):
    """Sides that share a strong (seed, prompt) effect: paired, the effect cancels; with A's seeds
    relabelled (each seed's images compared with another seed's) it no longer does."""
    base = shared(0.3)
    a, b = noisy(lambda s, p: base(s, p) + 0.05, 0.01, 1), noisy(base, 0.01, 2)
    two_methods(tmp_path / "paired", a, b)
    for seed in SEEDS:
        write_job(tmp_path / "shuffled", "mi", 1, seed, a, train_seed=(seed + 1) % 3)
        write_job(tmp_path / "shuffled", "random", 1, seed, b)
    paired = table(tmp_path / "paired", "mi-random")[("mi-random", "all", 1, 7.5)]
    unpaired = table(tmp_path / "shuffled", "mi-random")[("mi-random", "all", 1, 7.5)]
    assert paired["ci_low"] < 0.05 < paired["ci_high"] and paired["ci_low"] > 0.04
    assert unpaired["ci_high"] - unpaired["ci_low"] > 10 * (paired["ci_high"] - paired["ci_low"])


def test_base_is_round_zero_of_any_run_and_one_sided_cells_are_named(tmp_path, caplog):
    base = shared(0.1)
    for seed in SEEDS:
        for method in ("mi", "random"):  # every run of a seed evaluates the same base images
            write_job(tmp_path, method, 0, seed, noisy(base, 0.05, 0), with_category=False)
        write_job(tmp_path, "mi", 1, seed, noisy(lambda s, p: base(s, p) + 0.1, 0.05, 1))
        if seed != 2:
            write_job(tmp_path, "random", 1, seed, noisy(base, 0.05, 2))
        write_job(tmp_path, "random", 2, seed, noisy(base, 0.05, 3))  # a round mi did not train: no row, no warning
    with caplog.at_level(logging.WARNING, logger="mitune.contrasts"):
        rows = table(tmp_path, "mi-base", "mi-random")
    assert "mi-random round 1 CFG 7.5: cells of seed(s) 2 lack random" in caplog.text and "round 2" not in caplog.text
    assert set(rows) == {(c, k, 1, 7.5) for c in ("mi-base", "mi-random") for k in ("all", "color", "shape")}
    assert rows[("mi-base", "all", 1, 7.5)]["n_seeds"] == 3 and rows[("mi-random", "all", 1, 7.5)]["n_seeds"] == 2
    assert 0 < rows[("mi-base", "all", 1, 7.5)]["ci_low"] < 0.1 < rows[("mi-base", "all", 1, 7.5)]["ci_high"]


def test_a_method_against_its_own_earlier_round_pins_both_rounds(tmp_path):
    """``mi@2-mi@1``: round 2 against round 1 of the same runs, paired by seed and prompt (did a round help?)."""
    base = shared(0.1)
    for seed in SEEDS:
        write_job(tmp_path, "mi", 1, seed, noisy(base, 0.05, 1))
        write_job(tmp_path, "mi", 2, seed, noisy(lambda s, p: base(s, p) - 0.15, 0.05, 2))
        write_job(tmp_path, "mi", 0, seed, noisy(base, 0.05, 3))
    rows = table(tmp_path, "mi@2-mi@1", "mi@2-base")
    drop, against_base = rows[("mi@2-mi@1", "all", "2 vs 1", 7.5)], rows[("mi@2-base", "all", "2 vs 0", 7.5)]
    assert drop["ci_low"] < -0.15 < drop["ci_high"] < 0 and drop["n_seeds"] == 3
    assert against_base["mean_diff"] == pytest.approx(drop["mean_diff"], abs=0.03)
    assert {key[2] for key in rows} == {"2 vs 1", "2 vs 0"}  # one row per CFG, not one per round
    with pytest.raises(ContrastError, match="pins the round of one side only"):
        table(tmp_path, "mi@2-mi")


def test_the_interval_spans_the_spread_of_training_seeds_and_of_whole_prompts():
    noise = 0.001 * np.random.default_rng(0).standard_normal((3, 30))
    by_seed = np.array([0.0, 0.1, 0.2])[:, None] + noise  # a bootstrap over prompts alone: width ~0.001
    low, high = crossed_bootstrap(by_seed)
    assert low < 0.05 and high > 0.15
    # A prompt's effect shared by every seed: 30 prompts, not 90 independent cells (nested: width ~0.025).
    by_prompt = np.linspace(0.0, 0.2, 30)[None, :] + noise
    by_prompt[1, :5] = np.nan  # cells with no pair are left out
    low, high = crossed_bootstrap(by_prompt)
    assert low < 0.1 < high and 0.035 < high - low < 0.05


def test_cli_writes_the_contrasts_table(tmp_path, capsys):
    base = shared(0.1)
    for seed in SEEDS:
        for salt, (r, method) in enumerate([(0, "mi"), (1, "mi"), (1, "random"), (1, "toy_oracle")]):
            for cfg in (3.0, 7.5):
                write_job(tmp_path / "eval", method, r, seed, noisy(base, 0.05, salt), cfg=cfg)
    out = tmp_path / "summary"
    argv = [str(tmp_path / "eval"), "--out", str(out), "--cfg", "3.0", "7.5", "--no-wandb", "--contrast"]
    assert summary.main([*argv, "toy_oracle-random", "mi-random", "mi-base", "toy_oracle-base"]) == 0
    with open(out / "contrasts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert {(row["contrast"], row["round"], row["cfg"]) for row in rows if row["category"] == "all"} == {
        (c, "1", g) for c in ("toy_oracle-random", "mi-random", "mi-base", "toy_oracle-base") for g in ("3.0", "7.5")}
    assert "| toy_oracle-random | all | 1 | 3 |" in (out / "contrasts.md").read_text()

    assert summary.main([*argv, "mi-oracle"]) == 1
    assert "contrast 'mi-oracle' is not A-B of two evaluated methods" in capsys.readouterr().err
