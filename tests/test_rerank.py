"""MI best-of-N (``mitune.rerank`` and ``mitune rerank``): ranking, batch independence, bad input."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from mitune.cli import main as cli_main
from mitune.mi.estimators import sample_with_mi
from mitune.mi.pipeline import ddpm_scheduler, encode_prompts, latent_shape, null_embedding, unet_eps_fn
from mitune.models.loading import load_pipeline
from mitune.rerank import RerankConfig, rerank, write_ranking

PROMPT = "a red apple and a green book"


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_pipeline(str(tiny_sd_path))


def test_candidates_come_best_first_with_their_own_mi(pipe):
    config = RerankConfig(n=3, num_inference_steps=3, batch_size=2)
    ranked = rerank(pipe, PROMPT, config, progress=False)
    assert [c.rank for c in ranked] == [1, 2, 3]
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    assert sorted(c.index for c in ranked) == [0, 1, 2] and all(c.score == c.mi for c in ranked)
    # Candidate 1 alone, straight from sample_with_mi with its seed: the same MI (no batch effect).
    one = next(c for c in ranked if c.index == 1)
    generator = [torch.Generator().manual_seed(one.seed)]
    z_T = randn_tensor(latent_shape(pipe, 1), generator=generator, dtype=torch.float32)
    _, mi = sample_with_mi(unet_eps_fn(pipe), z_T, encode_prompts(pipe, [PROMPT]), null_embedding(pipe),
                           ddpm_scheduler(pipe), num_inference_steps=3, guidance_scale=7.5, generator=generator)
    assert one.mi == pytest.approx(mi.item(), rel=1e-4)
    # Best-of-2 ranks the first 2 of best-of-3.
    first_two = rerank(pipe, PROMPT, RerankConfig(n=2, num_inference_steps=3, batch_size=2), progress=False)
    assert {c.index: c.mi for c in first_two} == pytest.approx({c.index: c.mi for c in ranked if c.index < 2}, rel=1e-5)


def test_phrase_mi_ranks_by_the_most_neglected_phrase(pipe, tmp_path):
    config = RerankConfig(n=3, score="phrase-mi", phrases=("a red apple", "green"), num_inference_steps=3)
    ranked = rerank(pipe, PROMPT, config, progress=False)
    for cand in ranked:
        assert set(cand.phrase_mi) == {"a red apple", "green"}
        assert cand.score == min(cand.phrase_mi.values())
    table = write_ranking(ranked, tmp_path)
    rows = list(csv.DictReader(table.open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["rank", "candidate", "seed", "mi", "score", "phrase_mi[a red apple]", "phrase_mi[green]",
                             "file_name"]
    assert all((tmp_path / r["file_name"]).is_file() for r in rows)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real ``mitune rerank`` command, for the one test of its console output: in this process, state that
    earlier tests left (diffusers' progress bars switched off) could hide the noise it checks for."""
    return subprocess.run([sys.executable, "-m", "mitune.cli", "rerank", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.slow
def test_cli_ranks_the_embedded_toy_model(tmp_path):
    out = tmp_path / "ranked"
    done = cli("--model", "toy", "--prompt", "a red square and a yellow circle", "-n", "2", "--steps", "2",
               "--score", "phrase-mi", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out / "ranking.csv")
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert len(rows) == 2 and {"phrase_mi[a red square]", "phrase_mi[a yellow circle]"} <= set(rows[0])
    assert "Loading pipeline components" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a red square", "-n", "0"], "n (the number of candidates) must be >= 1, got 0"),
    (["--prompt", "  "], "prompt must be a non-empty string"),
    (["--prompt", "a red square", "--score", "phrase-mi", "--phrase", "a blue ball"],
     "unknown phrase 'a blue ball': not in prompt 'a red square'"),
    (["--prompt", "a red square", "--phrase", "a red square"], "phrases are only used with score='phrase-mi'"),
])
def test_cli_bad_input_fails_before_loading_the_model(args, message, tmp_path, capsys):
    """The model path does not exist: the input error comes first, on one line, no traceback."""
    assert cli_main(["rerank", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *args]) == 1
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1].startswith(f"mitune rerank: error: {message}")
    assert "Traceback" not in stderr


def test_toy_benchmark_auc_and_best_of_n(load_benchmark):
    """The helpers behind docs/mi/toy.md, on hand-made rows."""
    toy = load_benchmark("toy_mi")
    labels = np.array([True, False, True, False])
    assert toy.roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert toy.roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert toy.roc_auc(np.array([0.5, 0.5, 0.9, 0.1]), labels) == 0.875  # one tie counts half
    assert np.isnan(toy.roc_auc(np.array([1.0, 2.0]), np.array([True, True])))
    rows = [{"prompt": "p", "candidate": c, "mi": mi, "oracle": oracle}
            for c, (mi, oracle) in enumerate([(1.0, 0.2), (3.0, 0.5), (2.0, 1.0), (9.0, 0.0)])]
    assert toy.best_of_n(rows, 3, lambda r: r["mi"]) == 0.5  # candidate 3 is outside the first 3
    assert toy.best_of_n(rows, 4, lambda r: r["mi"]) == 0.0
