"""Summary tables and the trade-off plot; one end-to-end CPU sweep: train once, evaluate a grid, summarise."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitune import summary
from mitune.run import train
from mitune.runs.artifacts import RESULT_COLUMNS as COLUMNS
from mitune.runs.io import csv_text

REPO = Path(__file__).resolve().parents[1]


def result(method: str, category: str, r: int, cfg: float, metric: str, kind: str, value: float) -> dict:
    return {"method": method, "category": category, "round": r, "cfg": cfg, "metric": metric, "kind": kind,
            "value": value, "std": 0.1 if kind == "alignment" else None, "n": 20, "num_prompts": 2,
            "images_per_prompt": 10, "seed": 1, "model": "m", "run_dir": "", "image_dir": ""}


def grid(categories=("color", "spatial"), rounds=(0, 1, 2), cfgs=(2.5, 7.5)) -> list[dict]:
    """Alignment grows with round and CFG, FID with CFG; values encode their point so tables can be checked."""
    rows = []
    for c, category in enumerate(categories):
        metric = {"color": "blip_vqa", "spatial": "spatial"}[category]
        for r in rounds:
            for g in cfgs:
                rows.append(result("mitune", category, r, g, metric, "alignment", c + 0.1 * r + 0.01 * g))
                rows.append(result("mitune", category, r, g, "mi_sampling", "mi", 10.0 + r))
                rows.append(result("mitune", category, r, g, "fid", "quality", 20 + 10 * c + r + g))
                rows.append(result("mitune", category, r, g, "cmmd", "quality", 0.5 + r))
    return rows


def write_results(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text(csv_text(rows, COLUMNS))
    return folder / "results.csv"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tables_from_two_categories(tmp_path):
    rows = grid()
    for i, point in enumerate(range(0, len(rows), 4)):  # one results.csv per job, as a sweep writes them
        write_results(tmp_path / "sweep" / f"job{i}", rows[point:point + 4])
    written = summary.summarize([tmp_path / "sweep"], tmp_path / "out", cfg=7.5)

    table1 = read_csv(written["table1_csv"])
    assert [r["model"] for r in table1] == ["base", "mitune R=1", "mitune R=2"]
    assert list(table1[0]) == ["model", "method", "round", "cfg", "color", "color_std", "color_n",
                               "spatial", "spatial_std", "spatial_n"]
    for r, row in enumerate(table1):
        assert float(row["color"]) == pytest.approx(0.1 * r + 0.075)
        assert float(row["spatial"]) == pytest.approx(1 + 0.1 * r + 0.075)
        assert (row["color_std"], row["color_n"]) == ("0.1", "20")
    md = written["table1_md"].read_text().splitlines()
    # The table says which CFGs it shows, of those evaluated.
    assert md[0].startswith("CFG shown: 7.5 (evaluated: 2.5, 7.5; `--cfg` picks others;")
    assert "CFG 7.5 (mean ± std over images, n = 20 images per cell;" in md[2]
    assert md[4:6] == ["| model | method | round | color | spatial |", "|---|---|---|---|---|"]
    assert md[7] == "| mitune R=1 | mitune | 1 | 0.175 ± 0.1 | 1.175 ± 0.1 |"

    table2 = read_csv(written["table2_csv"])
    assert list(table2[0]) == ["model", "method", "round", "category", "cfg", "cmmd", "fid"]
    assert len(table2) == 3 * 2 * 2
    point = next(r for r in table2 if (r["model"], r["category"], r["cfg"]) == ("mitune R=2", "spatial", "2.5"))
    assert (float(point["fid"]), float(point["cmmd"])) == (pytest.approx(34.5), pytest.approx(2.5))
    assert "| mitune R=2 | mitune | 2 | spatial | 2.5 | 2.5 | 34.5 |" in written["table2_md"].read_text()

    collected = read_csv(written["results"])
    assert len(collected) == len(rows) and list(collected[0]) == COLUMNS
    with Image.open(written["tradeoff"]) as png:
        assert png.format == "PNG" and png.size[0] >= 600 and png.size[1] >= 300  # two panels side by side


def test_series_of_the_tradeoff_plot():
    series = summary.tradeoff_series([summary.parse_row({k: str(v) if v is not None else "" for k, v in row.items()})
                                      for row in grid(categories=("color",))], "fid")
    assert set(series) == {"color"}
    assert sorted(series["color"]) == [("", 0), ("mitune", 1), ("mitune", 2)]  # the base model is its own line
    sem = pytest.approx(0.1 / 20 ** 0.5)  # std 0.1 over n = 20 images
    assert series["color"][("mitune", 1)] == [(2.5, 23.5, pytest.approx(0.125), sem), (7.5, 28.5, pytest.approx(0.175), sem)]


def test_newest_result_wins_and_other_cfg(tmp_path):
    old = write_results(tmp_path / "a", grid(categories=("color",), rounds=(0,), cfgs=(2.5,)))
    newer = [dict(row, value=row["value"] + 100) for row in grid(categories=("color",), rounds=(0,), cfgs=(2.5,))]
    write_results(tmp_path / "b", newer)
    os.utime(old, (1, 1))
    rows = summary.collect([tmp_path])
    assert sorted(r["value"] for r in rows if r["metric"] == "blip_vqa") == [pytest.approx(100.025)]
    header, body = summary.table1(rows, 2.5)
    assert body == [["base", "base", 0, pytest.approx(100.025), 0.1, 20]]
    with pytest.raises(summary.SummaryError, match=r"no alignment results at CFG 7.5; evaluated CFGs: \[2.5\]"):
        summary.table1(rows, 7.5)


def test_results_of_different_base_weights_are_refused_and_unrecorded_ones_named(tmp_path, caplog):
    """One summary, one base model: round 0 of two base models would be one "base" row."""
    rows = grid(categories=("color",), rounds=(0, 1), cfgs=(7.5,))
    write_results(tmp_path / "a", [dict(row, weights="aaaaaaaaaaaa", image_dir="/x/a") for row in rows])
    write_results(tmp_path / "b", [dict(row, weights="bbbbbbbbbbbb", image_dir="/x/b", method="other") for row in rows])
    with pytest.raises(summary.SummaryError, match=r"different base weights .*: weights aaaaaaaaaaaa \(8 rows, e.g. "
                                                   r"/x/a\); weights bbbbbbbbbbbb \(8 rows, e.g. /x/b\); summarize"):
        summary.collect([tmp_path])
    assert summary.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-wandb"]) == 1

    (tmp_path / "b" / "results.csv").write_text(csv_text([dict(row, method="other") for row in rows],
                                                         [c for c in COLUMNS if c != "weights"]))  # made before
    with caplog.at_level("WARNING", logger="mitune.summary"):
        collected = summary.collect([tmp_path])
    assert {row["weights"] for row in collected} == {"aaaaaaaaaaaa", ""}
    assert caplog.text.count("no weights digest") == 1 and "8 result rows" in caplog.text


def test_alignment_only_results_give_table1_and_say_why_no_plot(tmp_path, caplog):
    rows = [row for row in grid(categories=("color",)) if row["kind"] != "quality"]
    write_results(tmp_path / "sweep", rows)
    written = summary.summarize([tmp_path / "sweep"], tmp_path / "out")
    assert set(written) == {"results", "table1_md", "table1_csv", "rounds"}
    assert "no quality results" in caplog.text


def test_cli_errors(tmp_path, capsys):
    assert summary.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-wandb"]) == 1
    assert "no results.csv under" in capsys.readouterr().err
    assert summary.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--no-wandb"]) == 1
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def evaluate_grid(*args: str) -> None:
    """``python -m mitune.evaluate -m``: a sweep needs Hydra's launcher, which only the real command has."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "-m", "mitune.evaluate", "-m", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


PROMPTS = "data.prompts=[a red square,a blue circle and a green triangle]"


@pytest.mark.slow
def test_train_once_evaluate_the_grid_and_summarise(task_config, tiny_sd_path, tmp_path, monkeypatch, capsys):
    """Rounds are trained once (R=2) and shared by every CFG of the evaluation grid."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, sweep, out = tmp_path / "run", tmp_path / "sweep", tmp_path / "summary"
    train(task_config("config", [
        "scale=smoke", "model=tiny", "data=demo", f"model.path_or_id={tiny_sd_path}", PROMPTS, "rounds=2", "logger=csv",
    ], run_dir))
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    evaluate_grid("model=tiny", "data=demo", f"model.path_or_id={tiny_sd_path}", PROMPTS, f"run_dir={run_dir}",
                  "eval.round=0,1,2", "generation.guidance_scale=2.5,7.5", "scale=smoke",
                  "eval.num_images=2", "eval.category=toy", "eval.alignment=[toy_oracle]", "eval.quality=[fid]",
                  f"eval.reference={reference}",
                  "+eval.metric_kwargs.fid.extractor._target_=tests.test_evaluate.ColorFeatures",
                  f"hydra.sweep.dir={sweep}")
    capsys.readouterr()
    assert summary.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    # One job dir per grid point; images generated once per (round, CFG) into the run dir, from the run's adapters.
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [f"round_{r}-cfg_{g}" for r in (0, 1, 2) for g in (2.5, 7.5)]
    assert sorted(p.parent.name for p in (run_dir / "eval").glob("round_*/cfg*")) == ["round_0"] * 2 + ["round_1"] * 2 + ["round_2"] * 2
    mi = {job: [json.loads(x)["mi"] for x in (sweep / job / "scores.jsonl").read_text().splitlines()] for job in jobs}
    assert mi["round_0-cfg_7.5"] != mi["round_2-cfg_7.5"]  # the round-2 adapter changed the model
    assert mi["round_0-cfg_2.5"] != mi["round_0-cfg_7.5"]  # CFG changed the samples

    # Table 1 at CFG 7.5: the mean of each job's per-image oracle scores.
    def mean_score(job: str) -> float:
        return float(np.mean([json.loads(x)["toy_oracle"] for x in (sweep / job / "scores.jsonl").read_text().splitlines()]))

    table1 = read_csv(out / "table1.csv")
    assert [(r["model"], r["round"]) for r in table1] == [("base", "0"), ("mitune R=1", "1"), ("mitune R=2", "2")]
    assert [float(r["toy"]) for r in table1] == pytest.approx([mean_score(f"round_{r}-cfg_7.5") for r in (0, 1, 2)])
    assert (out / "table1.md").read_text().splitlines()[4] == "| model | method | round | toy |"
    assert [int(r["toy_n"]) for r in table1] == [2 * 2] * 3  # 2 prompts x eval.num_images=2
    table2 = read_csv(out / "table2.csv")
    assert [(r["model"], r["cfg"]) for r in table2] == [(m, g) for m in ("base", "mitune R=1", "mitune R=2")
                                                       for g in ("2.5", "7.5")]
    fids = {(row["round"], row["cfg"]): row["value"] for row in read_csv(out / "all_results.csv") if row["metric"] == "fid"}
    assert [r["fid"] for r in table2] == [fids[(r["round"], str(float(r["cfg"])))] for r in table2]
    with Image.open(out / "tradeoff.png") as png:
        png.verify()
        assert png.format == "PNG" and 400 <= png.size[0] <= 2000 and 300 <= png.size[1] <= 1500
    assert str(out / "tradeoff.png") in printed
    # Logged to W&B (offline): every job's table and the summary's plot.
    assert len(list(sweep.glob("*/wandb/offline-run-*/files/media/table/eval/results_*.table.json"))) == 6
    assert list(out.glob("wandb/offline-run-*/files/media/images/summary/tradeoff_*.png"))


def test_table1_cells_give_n_when_it_differs():
    rows = [summary.parse_row({k: str(v) if v is not None else "" for k, v in row.items()})
            for row in grid(categories=("color",), rounds=(0, 1), cfgs=(7.5,))]
    rows = [dict(row, n=10) if row["round"] == 1 else row for row in rows]
    note, header, body = summary.mean_pm_std(*summary.table1(rows, 7.5))
    assert note == "n images per cell" and header == ["model", "method", "round", "color"]
    assert body == [["base", "base", 0, "0.075 ± 0.1 (n=20)"], ["mitune R=1", "mitune", 1, "0.175 ± 0.1 (n=10)"]]


def test_table1_labels_give_the_seeds_when_rows_have_different_numbers_of_them(tmp_path):
    """Later rounds trained on fewer seeds (the toy benchmark): a header with one seed count would misstate them."""
    for seed in (1, 2, 3):
        rows = [dict(row, seed=seed, value=row["value"] + seed / 100) for row in grid(categories=("color",), cfgs=(7.5,))
                if row["round"] < 2 or seed < 3]
        write_results(tmp_path / f"seed{seed}", rows)
    summary.summarize([tmp_path], tmp_path / "out", cfg=7.5)
    table = (tmp_path / "out" / "table1.md").read_text()
    assert "mean ± std across the seeds each row's label gives" in table
    assert "| base (3 seeds) | base | 0 | 0.095 ± 0.01 (n=60) |" in table
    assert "| mitune R=2 (2 seeds) | mitune | 2 | 0.29 ± 0.0071 (n=40) |" in table
    summary.summarize([tmp_path / "seed1", tmp_path / "seed2"], tmp_path / "two", cfg=7.5)
    assert "mean ± std across 2 seeds" in (tmp_path / "two" / "table1.md").read_text()


def test_summary_logs_the_tradeoff_as_interactive_wandb_charts(tmp_path, monkeypatch):
    """W&B-native trade-off: one scatter chart per category (alignment vs quality, one point per (round, CFG)) and
    the table behind them, read back from the offline run's files."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = grid()
    for i, point in enumerate(range(0, len(rows), 4)):
        write_results(tmp_path / "sweep" / f"job{i}", rows[point:point + 4])
    out = tmp_path / "out"
    written = summary.summarize([tmp_path / "sweep"], out, cfg=[2.5, 7.5])
    points = read_csv(written["tradeoff_csv"])
    assert len(points) == 2 * 3 * 2  # category x round x CFG
    where = summary.log_to_wandb(written, out, "mitune")
    assert where.startswith("W&B: offline run summary-out") and "wandb sync" in where
    [run] = out.glob("wandb/offline-run-*")
    tables = {p.name.rsplit("_", 2)[0]: json.loads(p.read_text()) for p in run.glob("files/media/table/summary/*.table.json")}
    for category in ("color", "spatial"):
        chart = tables[f"tradeoff_{category}_table"]
        x, y = chart["columns"].index("quality"), chart["columns"].index("alignment")
        mine = [p for p in points if p["category"] == category]
        assert sorted((row[x], row[y]) for row in chart["data"]) == sorted(
            (float(p["quality"]), float(p["alignment"])) for p in mine)
    assert len(tables["tradeoff_points"]["data"]) == len(points)
    from tests.test_run import wandb_records  # the offline run file's records

    blob = b"".join(r.SerializeToString() for r in wandb_records(out))
    assert b"wandb/scatter" in blob and b"summary/tradeoff_color" in blob
