"""Successive halving by partial MI (generation.prune) with continuous batching, and the round's writer thread."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from mitune.config import register, typed
from mitune.mi.sampler import (
    Candidate,
    ContinuousSampler,
    SamplingConfig,
    kept_count,
    sample,
)
from mitune.models.loading import load_pipeline
from mitune.rounds import generation
from mitune.rounds.data import RoundSet
from mitune.rounds.loop import run_round
from mitune.rounds.selection import select_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RoundDir, finished
from mitune.runs.record import migrated

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["a red apple and a green book", "a cat on the left of a dog", "a blue car", "a small house"]
FULL = GenerationConfig(num_candidates=4, top_k=1, guidance_scale=5.0, num_inference_steps=6, micro_batch=4)
PRUNED = replace(FULL, prune=((0.34, 0.5), (0.67, 0.5)))  # steps 2 and 4 of 6: 4 -> 2 -> 1 candidates


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_pipeline(str(tiny_sd_path))


@pytest.fixture(scope="module")
def pruned(pipe, tmp_path_factory):
    return run_round(pipe, PROMPTS, PRUNED, tmp_path_factory.mktemp("pruned"), progress=False)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows_of(out: RoundDir) -> list[dict]:
    return out.rows()


@pytest.mark.parametrize(
    "prune,msg",
    [
        ([[0.4]], "generation.prune must be a list of \\[fraction of steps, fraction kept\\] pairs"),
        ([[0.0, 0.5]], "0 < fraction of steps < 1"),
        ([[0.5, 0.0]], "0 < fraction kept <= 1"),
        ([[0.5, 1.5]], "0 < fraction kept <= 1"),
        ([[0.01, 0.5]], "generation.prune: fraction 0.01 of 6 steps is step 0, outside \\[1, 5\\]"),
        ([[0.7, 0.5], [0.4, 0.5]], "increasing steps of 6, got steps \\[4, 2\\]"),
        ([[0.35, 0.5], [0.4, 0.5]], "increasing steps of 6, got steps \\[2, 2\\]"),
    ],
)
def test_bad_prune_schedules_fail_naming_the_key(prune, msg):
    with pytest.raises(ValueError, match=msg):
        replace(FULL, prune=prune)


def test_prune_refuses_what_it_cannot_rank_by():
    with pytest.raises(ValueError, match="generation.prune is not available with selection=phrase_mi"):
        replace(PRUNED, selection="phrase_mi")
    with pytest.raises(ValueError, match="generation.prune is not available with save_mi_maps"):
        replace(PRUNED, save_mi_maps=True)


def test_prune_from_the_command_line():
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["generation.prune=[[0.4,0.5],[0.7,0.5]]"])
        bad = compose("config", overrides=["generation.prune=[[0.4,x]]"])
    assert typed(cfg.generation, GenerationConfig, "generation").prune == ((0.4, 0.5), (0.7, 0.5))
    with pytest.raises(ValueError, match="config key generation.prune"):
        typed(bad.generation, GenerationConfig, "generation")


def test_records_and_rounds_made_before_prune_still_match():
    assert migrated({"generation": {"seed": 0}})["generation"]["prune"] == []
    assert "prune" not in generation.round_settings(type("P", (), {"config": type("C", (), {"_name_or_path": "m"}),
                                                                     "unet": type("U", (), {"dtype": "f"})})(), [], FULL)["generation"]


@pytest.mark.parametrize("alive,fraction,at_least,kept", [(50, 0.5, 1, 25), (25, 0.5, 1, 13), (10, 0.3, 1, 3),
                                                            (4, 0.25, 3, 3), (2, 0.1, 5, 2)])
def test_kept_count_rounds_up_and_never_drops_below_top_k(alive, fraction, at_least, kept):
    assert kept_count(alive, fraction, at_least) == kept


def test_continuous_sampler_without_pruning_is_sample(pipe):
    """Same rows, same chain: bit for bit what ``sample`` gives for that batch."""
    config = SamplingConfig(guidance_scale=5.0, num_inference_steps=6)
    seeds = [11, 12, 13, 14]
    reference = sample(pipe, [PROMPTS[0]] * 4, seeds, config)
    sampler = ContinuousSampler(pipe, config, rows=4)
    [(_, outcomes)] = list(sampler.run([Candidate(0, c, PROMPTS[0], s) for c, s in enumerate(seeds)]))
    assert torch.equal(torch.stack([o.latents for o in outcomes]), reference.latents)
    assert torch.equal(torch.tensor([o.mi for o in outcomes]), reference.mi)
    assert sampler.unet_rows == 2 * 4 * 6 and sampler.idle_rows == 0


def test_finished_candidates_are_those_of_the_unpruned_round(pipe, pruned, tmp_path):
    """Rows refilled with other prompts' candidates at other timesteps leave a candidate's numbers as they
    are: every finished candidate is bit-identical to the same candidate of a full round."""
    full = run_round(pipe, PROMPTS, FULL, tmp_path, progress=False)
    full_rows, rows = rows_of(full), rows_of(pruned)
    assert [(r["prompt_id"], r["candidate"], r["seed"]) for r in rows] == [
        (r["prompt_id"], r["candidate"], r["seed"]) for r in full_rows]
    done = finished(rows)
    assert len(done) == len(PROMPTS) and all(r["pruned_at"] is None for r in done)
    for row in done:
        twin = full_rows[rows.index(row)]
        assert row["mi"] == twin["mi"]
        stored = load_file(str(pruned.path / row["latents"]))
        mine = stored["latents"][stored["candidates"].tolist().index(row["candidate"])]
        assert torch.equal(mine, RoundDir(full.path).latents([twin])[0])
        assert (pruned.path / row["file_name"]).read_bytes() == (full.path / twin["file_name"]).read_bytes()


def test_pruned_rows_have_their_step_and_partial_mi_and_no_image(pruned):
    rows = rows_of(pruned)
    for pid in range(len(PROMPTS)):
        mine = [r for r in rows if r["prompt_id"] == pid]
        assert sorted((r["pruned_at"] for r in mine), key=str) == [2, 2, 4, None]
        for r in mine:
            if r["pruned_at"] is not None:
                assert r["file_name"] is None and r["latents"] is None and r["rank"] is None and not r["selected"]
                assert r["mi"] > 0
    images = sorted(p.name for p in (pruned.path / "images").iterdir())
    assert len(images) == len(PROMPTS)
    stats = json.loads(pruned.summary_file.read_text())
    assert (stats["num_images"], stats["num_pruned"]) == (len(PROMPTS), 3 * len(PROMPTS))


def test_pruning_keeps_the_highest_partial_mi(pipe):
    """At each point the candidates kept are those with the highest MI so far."""
    config = SamplingConfig(guidance_scale=5.0, num_inference_steps=6)
    seeds = [21, 22, 23, 24, 25, 26]
    sampler = ContinuousSampler(pipe, config, rows=3, prune_points=[(3, 0.5)])
    [(_, outcomes)] = list(sampler.run([Candidate(0, c, PROMPTS[1], s) for c, s in enumerate(seeds)]))
    stopped = [o for o in outcomes if o.pruned_at == 3]
    assert len(stopped) == 3
    # The finished ones' MI at step 3 is not stored; rerun them to step 3 by pruning everything but one.
    probe = ContinuousSampler(pipe, config, rows=3, prune_points=[(3, 1 / 6)])
    [(_, partial)] = list(probe.run([Candidate(0, c, PROMPTS[1], s) for c, s in enumerate(seeds)]))
    at_3 = {o.index: o.mi for o in partial if o.pruned_at == 3}
    best = max(range(6), key=lambda c: at_3.get(c, float("inf")))
    kept = {o.index for o in outcomes if o.pruned_at is None}
    assert best in kept
    assert min(at_3[c] for c in kept if c in at_3) >= max(o.mi for o in stopped)


def test_top_k_is_never_pruned_away(pipe, tmp_path):
    config = replace(PRUNED, top_k=3, prune=((0.5, 0.25),))
    out = run_round(pipe, PROMPTS[:2], config, tmp_path, progress=False)
    rows = rows_of(out)
    assert len(finished(rows)) == 2 * 3 and sum(r["selected"] for r in rows) == 2 * 3
    assert len(RoundSet.from_round(1, out).latents) == 2 * 3


def test_selection_ranks_finished_candidates_only(pruned):
    for pid in range(len(PROMPTS)):
        mine = finished([r for r in rows_of(pruned) if r["prompt_id"] == pid])
        assert [r["rank"] for r in mine] == [1] and mine[0]["selected"]


def test_pruning_saves_unet_rows_and_keeps_the_batch_full(pipe, tmp_path):
    full, pruned = {}, {}
    prompts = PROMPTS * 3
    run_round(pipe, prompts, FULL, tmp_path / "full", progress=False, timings=full)
    run_round(pipe, prompts, PRUNED, tmp_path / "pruned", progress=False, timings=pruned)
    assert full["unet_rows"] == 2 * len(prompts) * 4 * 6
    # per prompt: 4 candidates x 2 steps + 2 x 2 + 1 x 2 = 14 row-steps of 24
    useful = pruned["unet_rows"] - pruned["idle_rows"]
    assert useful == 2 * len(prompts) * 14
    assert pruned["idle_rows"] < 0.1 * pruned["unet_rows"]  # rows are refilled, only the round's tail runs short
    assert {"sample", "decode", "write", "wall"} <= set(pruned)


def test_crash_mid_round_resumes_bit_identically(pipe, pruned, tmp_path, monkeypatch):
    real_commit = generation.commit_prompt
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        real_commit(*args, **kwargs)

    monkeypatch.setattr(generation, "commit_prompt", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_round(pipe, PROMPTS, PRUNED, tmp_path, progress=False)
    assert 2 not in RoundDir(tmp_path).done_prompts()  # the writer finished what was handed to it, not this one
    monkeypatch.setattr(generation, "commit_prompt", real_commit)
    run_round(pipe, PROMPTS, PRUNED, tmp_path, progress=False)
    assert files_of(tmp_path) == files_of(pruned.path)


def test_ranks_take_whole_prompts_and_reproduce_one_process(pipe, pruned, tmp_path):
    for rank in (1, 0):
        generation.generate_round(pipe, PROMPTS, PRUNED, tmp_path, progress=False, rank=rank, world_size=2)
    select_round(tmp_path, len(PROMPTS), PRUNED)
    assert files_of(tmp_path) == files_of(pruned.path)


def test_a_pruned_round_reads_as_imagefolder(pruned):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(pruned.path), split="train")
    chosen = ds.filter(lambda row: row["selected"])
    assert len(chosen) == len(PROMPTS) and all(image is not None for image in chosen["image"])


@pytest.mark.parametrize("config", [FULL, PRUNED], ids=["full", "pruned"])
def test_writer_thread_changes_no_byte(pipe, tmp_path, config):
    on = run_round(pipe, PROMPTS, config, tmp_path / "on", progress=False, overlap=True)
    off = run_round(pipe, PROMPTS, config, tmp_path / "off", progress=False, overlap=False)
    assert files_of(on.path) == files_of(off.path)


def test_a_writer_error_reaches_the_round_and_earlier_prompts_are_kept(pipe, tmp_path, monkeypatch):
    real_commit = generation.commit_prompt

    def fail_on_prompt_2(round_dir, prompt, jobs, results, config):
        if jobs[0].prompt_id == 2:
            raise OSError("disk full")
        real_commit(round_dir, prompt, jobs, results, config)

    monkeypatch.setattr(generation, "commit_prompt", fail_on_prompt_2)
    with pytest.raises(OSError, match="disk full"):
        generation.generate_round(pipe, PROMPTS, FULL, tmp_path, progress=False)
    # prompts handed to the writer are finished (kept), the failed one is not committed
    assert {0, 1} <= RoundDir(tmp_path).done_prompts() and 2 not in RoundDir(tmp_path).done_prompts()


def test_the_rows_benchmark_counts_the_rows_the_sampler_ran(load_benchmark, monkeypatch, tmp_path):
    """benchmarks/pruning.py rows: full sampling's rows by formula (CFG doubles them); a pruned round runs fewer
    rows on candidates than full sampling, and its idle tail is at most one micro-batch per step."""
    pruning = load_benchmark("pruning")
    out = tmp_path / "rows.md"
    monkeypatch.setattr(sys, "argv", ["pruning.py", "rows", "--m", "8", "--rows-prompts", "12", "--wall-steps", "4",
                                      "--out", str(out)])
    pruning.main()
    [row] = [line for line in out.read_text().splitlines() if line.startswith("| 8 | 12 |")]
    _, _, full, pruned, idle, ratio = (cell.strip() for cell in row.strip("|").split("|"))
    steps = 4
    assert int(full) == 2 * 12 * 8 * steps
    assert 0 < int(pruned) - int(idle) < int(full)
    assert 0 <= int(idle) <= 2 * pruning.ROWS * steps
    assert float(ratio) == pytest.approx(int(pruned) / int(full), abs=1e-3)
