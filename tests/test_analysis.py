"""Sec. 3.1 analyses: Kendall tau between MI and a metric over MI ranks, and score CDFs by MI rank."""

from __future__ import annotations

import json
import math
import time

import pytest
from PIL import Image

from mitune import analysis
from mitune.models.loading import load_pipeline
from mitune.rounds.loop import run_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.io import read_jsonl, write_jsonl


def synthetic_round(num_prompts: int, m: int) -> list[dict]:
    """Rows as metadata.jsonl has them: MI decreasing with rank, and differing between prompts."""
    return [{"prompt": f"p{p}", "file_name": f"images/{p:06d}_{r:03d}.png", "rank": r, "mi": 100.0 * p + (m - r) + 0.5}
            for p in range(num_prompts) for r in range(1, m + 1)]


@pytest.mark.parametrize("sign,tau", [(1, 1.0), (-1, -1.0)])
def test_tau_is_one_for_concordant_and_minus_one_for_reversed_scores(sign, tau):
    rows = synthetic_round(num_prompts=6, m=50)
    scores = [sign * row["mi"] for row in rows]
    result = analysis.kendall_by_rank(rows, scores, [1, 25, 50], "synthetic")
    assert (result.mean_tau, result.std_tau, result.pooled_tau) == (pytest.approx(tau), 0.0, pytest.approx(tau))
    assert (result.num_prompts, result.num_undefined, result.ranks) == (6, 0, [1, 25, 50])


def test_tau_of_a_known_mixed_case():
    # Per prompt, over ranks 1/25/50: prompt 0 fully concordant (+1), prompt 1 has one swapped pair (1/3).
    rows = synthetic_round(num_prompts=2, m=50)
    wanted = {(0, 1): 3.0, (0, 25): 2.0, (0, 50): 1.0, (1, 1): 2.0, (1, 25): 3.0, (1, 50): 1.0}
    scores = [wanted.get((int(row["prompt"][1:]), row["rank"]), 0.0) for row in rows]
    result = analysis.kendall_by_rank(rows, scores, [1, 25, 50])
    assert result.mean_tau == pytest.approx((1 + 1 / 3) / 2)
    assert result.num_prompts == 2


def test_constant_scores_leave_tau_undefined_not_zero():
    rows = synthetic_round(num_prompts=3, m=3)
    scores = [1.0 if row["prompt"] == "p0" else row["mi"] for row in rows]
    result = analysis.kendall_by_rank(rows, scores, [1, 2, 3])
    assert (result.num_prompts, result.num_undefined, result.mean_tau) == (3, 1, pytest.approx(1.0))


@pytest.mark.parametrize("m,expected", [(50, [1, 25, 50]), (3, [1, 2, 3]), (10, [1, 5, 10]), (2, [1, 2])])
def test_paper_ranks_scale_to_the_rounds_m(m, expected):
    assert analysis.scale_ranks([1, 25, 50], m) == expected


@pytest.mark.parametrize(
    "ranks,m,msg",
    [([1], 50, "at least two values"), ([0, 50], 50, r"in \[1, 50\]"), ([1, 51], 50, r"in \[1, 50\]"),
     ([1, 50], 1, "at least 2 candidates"), ([1, 2], 3, "all map to rank 1 of M=3")],
)
def test_bad_ranks(ranks, m, msg):
    with pytest.raises(ValueError, match=msg):
        analysis.scale_ranks(ranks, m)


def test_missing_scores_or_ranks_are_refused():
    rows = synthetic_round(num_prompts=2, m=3)
    with pytest.raises(ValueError, match="got 5 scores for 6 images"):
        analysis.kendall_by_rank(rows, [0.0] * 5, [1, 3])
    with pytest.raises(ValueError, match=r"prompt 'p1' has 2 images; MI ranks \[1, 3\] need 3"):
        analysis.kendall_by_rank(rows[:-1], [0.0] * 5, [1, 3])


def test_mi_ranks_come_from_mi_not_from_the_selection_rank():
    """A round selected at random (toy control) ranks by another score; the analysis ranks by MI."""
    rows = [dict(row, rank=4 - row["rank"]) for row in synthetic_round(num_prompts=3, m=3)]
    result = analysis.kendall_by_rank(rows, [row["mi"] for row in rows], [1, 2, 3])
    assert result.mean_tau == pytest.approx(1.0)
    values, _ = analysis.score_cdfs(rows, [row["mi"] for row in rows], [1, 3])[1]
    assert values.tolist() == [2.5, 102.5, 202.5]  # the highest-MI image of each prompt


def test_cdfs_are_per_rank_distributions():
    rows = synthetic_round(num_prompts=4, m=3)
    scores = [row["mi"] for row in rows]
    cdfs = analysis.score_cdfs(rows, scores, [1, 3])
    values, cdf = cdfs[1]
    assert values.tolist() == sorted(row["mi"] for row in rows if row["rank"] == 1)
    assert cdf.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert (cdfs[1][0] > cdfs[3][0]).all()  # rank-1 scores dominate rank-3 ones: the CDF lies to the right


@pytest.fixture(scope="module")
def tiny_round(tiny_sd_path, tmp_path_factory):
    """A real generation round of the tiny model: 3 prompts x M=4 candidates, MI-ranked."""
    out = tmp_path_factory.mktemp("round")
    pipe = load_pipeline(str(tiny_sd_path))
    config = GenerationConfig(num_candidates=4, top_k=1, num_inference_steps=3, micro_batch=8)
    run_round(pipe, ["a red square", "a blue circle", "a green triangle"], config, out, progress=False)
    return out


def test_real_round_with_scores_file(tiny_round, tmp_path):
    rows = read_jsonl(tiny_round / "metadata.jsonl")
    write_jsonl(tmp_path / "scores.jsonl", [{"file_name": r["file_name"], "neg_mi": -r["mi"]} for r in reversed(rows)])
    code = analysis.main([str(tiny_round), "--scores", str(tmp_path / "scores.jsonl"), "--score-key", "neg_mi",
                          "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "kendall_neg_mi.json").read_text())
    assert (result["ranks"], result["num_candidates"], result["num_prompts"]) == ([1, 2, 4], 4, 3)
    assert result["mean_tau"] == pytest.approx(-1.0) and result["pooled_tau"] == pytest.approx(-1.0)
    with Image.open(tmp_path / "out" / "cdf_neg_mi.png") as png:
        assert png.format == "PNG" and png.size[0] >= 300 and png.size[1] >= 200


def test_real_round_scored_by_a_metric(tiny_round, tmp_path):
    code = analysis.main([str(tiny_round), "--metric", "toy_oracle", "toy_objects", "--ranks", "1", "50",
                          "--out", str(tmp_path)])
    assert code == 0
    for metric in ("toy_oracle", "toy_objects"):
        result = json.loads((tmp_path / f"kendall_{metric}.json").read_text())
        assert result["metric"] == metric and result["ranks"] == [1, 4] and result["num_prompts"] == 3
        assert math.isnan(result["mean_tau"]) or -1 <= result["mean_tau"] <= 1
        assert (tmp_path / f"cdf_{metric}.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert analysis.main([str(tmp_path), "--metric", "toy_oracle", "--out", str(tmp_path / "out")]) == 1
    assert "is not a finished round (it has no metadata.jsonl)" in capsys.readouterr().err


def test_missing_evaluation_model_is_one_line_without_waiting_for_the_hub(tiny_round, tmp_path, capsys):
    start = time.monotonic()
    assert analysis.main([str(tiny_round), "--metric", "blip_vqa", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - start < 20
    assert err.count("\n") == 1 and "blip_vqa needs the model 'Salesforce/blip-vqa-capfilt-large'" in err
    assert "hf download Salesforce/blip-vqa-capfilt-large" in err
