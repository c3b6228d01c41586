"""Generation rounds: layout, selection, determinism and crash-safe resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mitune.models.loading import load_pipeline
from mitune.rounds import generation
from mitune.rounds.loop import run_round
from mitune.rounds.selection import select_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RoundDir
from mitune.runs.seeds import candidate_seed

PROMPTS = ["a red apple and a green book", "a cat on the left of a dog", "a blue car"]
CONFIG = GenerationConfig(num_candidates=4, top_k=2, guidance_scale=5.0, num_inference_steps=3, micro_batch=5)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_pipeline(str(tiny_sd_path))


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return run_round(pipe, PROMPTS, CONFIG, out, progress=False)


def stats_of(out: RoundDir) -> dict[str, float]:
    return json.loads(out.summary_file.read_text())


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_writes_every_candidate_and_marks_top_k(reference):
    rows = [json.loads(line) for line in (reference.path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * CONFIG.num_candidates == stats_of(reference)["num_images"]
    for pid, prompt in enumerate(PROMPTS):
        mine = [r for r in rows if r["prompt_id"] == pid]
        assert {r["prompt"] for r in mine} == {prompt}
        assert sorted(r["rank"] for r in mine) == [1, 2, 3, 4]
        best = sorted(mine, key=lambda r: -r["mi"])[: CONFIG.top_k]
        assert {r["candidate"] for r in mine if r["selected"]} == {r["candidate"] for r in best}
        stored = load_file(str(reference.path / mine[0]["latents"]))
        assert stored["latents"].shape[0] == CONFIG.num_candidates
        assert torch.equal(stored["mi"], torch.tensor([r["mi"] for r in mine], dtype=torch.float32))
    assert all((reference.path / r["file_name"]).is_file() for r in rows)
    assert all(r["mi"] > 0 for r in rows)
    assert stats_of(reference)["selection_margin"] > 0


def test_seeds_are_per_prompt_or_shared():
    assert candidate_seed(0, "a", 1) == candidate_seed(0, "a", 1)
    assert len({candidate_seed(0, p, c) for p in PROMPTS for c in range(4)}) == 12
    assert candidate_seed(0, "a", 3, "shared") == candidate_seed(0, "b", 3, "shared") == 3


def test_round_reads_as_imagefolder(reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(reference.path), split="train")
    assert len(ds) == stats_of(reference)["num_images"]
    assert {"image", "prompt", "mi", "rank", "selected", "seed"} <= set(ds.column_names)
    assert sum(ds["selected"]) == len(PROMPTS) * CONFIG.top_k


def test_rerun_is_byte_identical(pipe, reference, tmp_path):
    run_round(pipe, PROMPTS, CONFIG, tmp_path, progress=False)
    assert files_of(tmp_path) == files_of(reference.path)


def test_micro_batch_only_changes_float_noise(pipe, reference, tmp_path):
    other = run_round(pipe, PROMPTS, replace(CONFIG, micro_batch=12), tmp_path, progress=False)
    rows = lambda s: [json.loads(x) for x in (s.path / "metadata.jsonl").read_text().splitlines()]
    a, b = rows(reference), rows(other)
    assert [r["selected"] for r in a] == [r["selected"] for r in b]
    torch.testing.assert_close(torch.tensor([r["mi"] for r in a]), torch.tensor([r["mi"] for r in b]), rtol=1e-4, atol=0)


def test_crash_mid_round_resumes_without_loss_or_duplicates(pipe, reference, tmp_path, monkeypatch):
    real_commit = generation.commit_prompt
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real_commit(*args, **kwargs)

    monkeypatch.setattr(generation, "commit_prompt", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_round(pipe, PROMPTS, CONFIG, tmp_path, progress=False)
    assert len(list((tmp_path / "parts").glob("*.jsonl"))) == 1
    monkeypatch.setattr(generation, "commit_prompt", real_commit)
    run_round(pipe, PROMPTS, CONFIG, tmp_path, progress=False)
    assert files_of(tmp_path) == files_of(reference.path)


def test_resume_with_other_settings_is_refused(pipe, reference, tmp_path):
    run_round(pipe, PROMPTS[:1], CONFIG, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different settings \\(generation\\)"):
        run_round(pipe, PROMPTS[:1], replace(CONFIG, guidance_scale=2.5), tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(num_candidates=2, top_k=3), r"top_k must be in \[1, M=2\], got 3"),
        (dict(num_candidates=0), "M\\) must be >= 1, got 0"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0, got -1.0"),
        (dict(micro_batch=0), "micro_batch must be >= 1"),
        (dict(seed_mode="global"), "seed_mode"),
    ],
)
def test_bad_generation_settings(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("m,mb,sizes", [(4, 5, [5, 5, 2]), (4, 8, [8, 4]), (4, 3, [3] * 4), (5, 2, [2] * 7 + [1])])
def test_micro_batches_are_full_and_keep_the_job_order(m, mb, sizes):
    jobs = generation.make_jobs(PROMPTS, replace(CONFIG, num_candidates=m, top_k=1))
    batches = generation.micro_batches(jobs, mb)
    assert [len(b) for b in batches] == sizes
    assert [j for b in batches for j in b] == jobs


@pytest.mark.parametrize("micro_batch", [5, 2], ids=["whole-prompts", "prompts-split-in-batches"])
def test_ranks_sharing_a_round_reproduce_one_process(pipe, tmp_path, micro_batch):
    config = replace(CONFIG, micro_batch=micro_batch)
    one = run_round(pipe, PROMPTS, config, tmp_path / "one", progress=False)
    for rank in (1, 0):  # rank 1 first: the settings file is written by rank 0 only
        share = generation.generate_round(pipe, PROMPTS, config, tmp_path / "two", progress=False, rank=rank, world_size=2)
        assert not share.is_complete()  # the caller completes the round once every rank is in
    select_round(tmp_path / "two", len(PROMPTS), config)
    assert files_of(tmp_path / "two") == files_of(one.path)


@pytest.mark.parametrize("m, mb, world", [(4, 2, 2), (5, 2, 3), (4, 8, 2), (50, 50, 4), (7, 3, 2)])
def test_rank_shares_cover_every_batch_once_and_never_split_a_prompt(m, mb, world):
    jobs = [generation.Job(p, c, 0) for p in range(5) for c in range(m)]
    batches = generation.micro_batches(jobs, mb)
    shares = [generation.rank_batches(batches, r, world) for r in range(world)]
    assert sorted(map(id, (b for share in shares for b in share))) == sorted(map(id, batches))
    owners = {}
    for r, share in enumerate(shares):
        for batch in share:
            for job in batch:
                assert owners.setdefault(job.prompt_id, r) == r, f"prompt {job.prompt_id} split between ranks"


def test_random_selection_keeps_the_candidates_and_changes_only_the_choice(pipe, reference, tmp_path):
    summary = run_round(pipe, PROMPTS, replace(CONFIG, selection="random"), tmp_path, progress=False)
    rows = [json.loads(line) for line in (summary.path / "metadata.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference.path / "metadata.jsonl").read_text().splitlines()]
    assert [r["mi"] for r in rows] == [r["mi"] for r in ref]  # same images, same MI
    assert [r["selected"] for r in rows] != [r["selected"] for r in ref]
    for pid in range(len(PROMPTS)):
        mine = [r for r in rows if r["prompt_id"] == pid]
        best = sorted(mine, key=lambda r: -r["score"])[: CONFIG.top_k]
        assert {r["candidate"] for r in mine if r["selected"]} == {r["candidate"] for r in best}


def test_oracle_selection_rejects_prompts_outside_the_toy_grammar(pipe, tmp_path):
    with pytest.raises(ValueError, match="selection=toy_oracle: .* is not a toy-world prompt"):
        run_round(pipe, PROMPTS, replace(CONFIG, selection="toy_oracle"), tmp_path / "round", progress=False)
    assert not (tmp_path / "round").exists()


def test_rank_groups_hold_lcm_jobs_so_shares_stay_balanced():
    jobs = [generation.Job(p, c, 0) for p in range(12) for c in range(4)]  # M=4, micro_batch=6: lcm 12 = 3 prompts
    shares = [generation.rank_batches(generation.micro_batches(jobs, 6), r, 2) for r in range(2)]
    assert [sorted({j.prompt_id for b in share for j in b}) for share in shares] == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    assert all(len(b) == 6 for share in shares for b in share)
