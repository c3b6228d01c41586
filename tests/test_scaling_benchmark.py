"""The scaling benchmark runs end to end at tiny sizes, and its cost model and GPU arithmetic are right."""

import pytest

from mitune.rounds.generation import make_jobs, micro_batches
from mitune.rounds.settings import GenerationConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scaling(load_benchmark):
    return load_benchmark("scaling")


def table_rows(text: str) -> list[list[str]]:
    """Cells of the measured table's rows (those whose first cell is a sweep name)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if r[0] in ("M", "P", "W") and r[1].isdigit()]


@pytest.mark.slow
def test_main_writes_report_and_figure(scaling, tmp_path):
    argv = ["--steps", "2", "--repeats", "1", "--ms", "1", "2", "--m-prompts", "2", "--ps", "1", "2",
            "--p-candidates", "2", "--micro-batch", "4", "--worlds", "1", "2", "--ddp", "2", "2", "2",
            "--out", str(tmp_path)]
    report = scaling.main(argv)
    assert report == tmp_path / "scaling.md"
    text = report.read_text()
    assert "Command: `python benchmarks/scaling.py --steps 2 --repeats 1" in text
    assert "1-min load average" in text
    png = (tmp_path / "scaling.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

    rows = table_rows(text)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("M", "2", "1", "1"), ("M", "2", "2", "1"), ("P", "1", "2", "1"), ("P", "2", "2", "1"),
        ("W", "2", "2", "1"), ("W", "2", "2", "2"),
    ]
    for _, prompts, candidates, _, world, images, batches, metadata_rows, median, _, share, model, *_ in rows:
        assert int(metadata_rows) == int(images) == int(prompts) * int(candidates)  # W=2 too: a complete round
        assert float(median) > 0 and 0 < float(share) <= 1.05
        assert float(model.split()[0]) > 0 and model.endswith("(predicted)") == (world != "1")
    assert rows[-1][6] == "1"  # 2 micro-batches of 2 images, one per rank

    assert "## GPU projection (modelled, not measured)" in text
    for model in ("SD-2.1-base 512 px", "SDXL 1024 px"):
        for gpu in ("H100", "A100"):
            assert f"| {model} | {gpu} | 45% |" in text and f"| {model} | {gpu} | 20% |" in text
    assert "## What it shows" in text


@pytest.mark.parametrize("prompts, candidates, micro_batch, world_size", [
    (4, 8, 16, 1), (5, 8, 16, 2), (8, 8, 8, 2), (7, 3, 8, 3), (3, 50, 16, 2), (2, 20, 16, 2),
])
def test_batch_counts_match_micro_batches(scaling, prompts, candidates, micro_batch, world_size):
    config = GenerationConfig(num_candidates=candidates, micro_batch=micro_batch)
    batches = micro_batches(make_jobs([f"prompt {i}" for i in range(prompts)], config), micro_batch)
    loads = [scaling.rank_load(prompts, candidates, micro_batch, world_size, rank) for rank in range(world_size)]
    assert sum(n for n, _ in loads) == len(batches) and sum(i for _, i in loads) == prompts * candidates
    assert all(loads[0][i] >= load[i] for load in loads for i in (0, 1))  # rank 0 is the critical path


def test_fit_recovers_known_constants_from_single_rank_points(scaling):
    shapes = [(4, 1, 16, 1), (4, 16, 16, 1), (8, 8, 8, 1), (1, 8, 4, 1), (8, 8, 8, 2)]
    points = [scaling.Point("M", p, m, b, w) for p, m, b, w in shapes]
    for p in points:
        batches, images = scaling.rank_load(p.prompts, p.candidates, p.micro_batch, p.world_size)
        p.times = [0.2 * batches + 0.03 * images + 0.5]
    points[-1].times = [99.0]  # ranks slowing each other: predicted, not fitted
    coef = scaling.fit(points)
    assert coef == pytest.approx([0.2, 0.03, 0.5])
    assert scaling.predict(coef, points[-1]) == pytest.approx(0.2 * 4 + 0.03 * 32 + 0.5)


def test_round_hours_by_hand(scaling):
    # 1 TFLOP per image at 50% of 100 TFLOP/s = 0.02 s; 700 prompts on 8 GPUs: ceil(700 / 8) = 88 prompts each.
    assert scaling.round_hours(1e12, 100.0, 0.5, 8) == pytest.approx(88 * 50 * 0.02 / 3600)
    assert scaling.round_hours(1e12, 100.0, 0.5, 1, candidates=10) == pytest.approx(700 * 10 * 0.02 / 3600)


def test_sd21_image_costs_fifty_cfg_pair_forwards(scaling):
    per_step = scaling.flops_per_image("sd21", 64, 1)
    assert 1.2e12 < per_step < 2.0e12  # ~0.8 TFLOP per 512 px sample (docs/evaluation.md quotes 0.68 from BK-SDM)
    assert scaling.flops_per_image("sd21", 64, 50) == 50 * per_step
