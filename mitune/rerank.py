"""MI best-of-N at inference: sample N candidates, keep them ranked by the model's own MI.

No fine-tuning: the candidates come from any supported diffusers pipeline (SD 1.x/2.x, SDXL)
through the fused sampler, so ranking by MI costs no UNet call beyond CFG's. Ranking by
phrase MI (the minimum over the prompt's phrases of ``I(z; phrase | rest)``) penalises an
image that neglects one phrase, at P more UNet rows per candidate per step for P phrases.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from mitune.mi.estimators import MIConfig
from mitune.mi.phrases import check_prompt, prompt_phrases
from mitune.mi.pipeline import decode_latents
from mitune.mi.sampler import PAPER_SAMPLING, SamplingConfig, sample
from mitune.rounds.selection import rank_by_score
from mitune.runs import io as mio
from mitune.runs.seeds import candidate_seed

Score = Literal["mi", "phrase-mi"]
SCORES = ("mi", "phrase-mi")
TABLE = "ranking.csv"
REQUEST = "rerank.json"  # the prompt (and settings) a folder's ranking is of


@dataclass
class Candidate:
    """One sample, its MI (and phrase MI) and where it ranked (1 = best)."""

    index: int
    seed: int
    mi: float
    score: float
    rank: int
    image: Image.Image = field(repr=False)
    phrase_mi: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RerankConfig:
    """What to sample and how to rank it; the sampler defaults are the paper's."""

    n: int = 16
    score: Score = "mi"
    phrases: tuple[str, ...] | None = None
    guidance_scale: float = PAPER_SAMPLING.guidance_scale
    num_inference_steps: int = PAPER_SAMPLING.num_inference_steps
    seed: int = 0
    batch_size: int = 8
    mi: MIConfig = PAPER_SAMPLING.mi

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (the number of candidates) must be >= 1, got {self.n}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.phrases is not None and self.score != "phrase-mi":
            raise ValueError("phrases are only used with score='phrase-mi'")
        self.sampling  # noqa: B018  (checks the sampling settings)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                              mi=self.mi)


def check_request(prompt: str, config: RerankConfig) -> tuple[str, list[str]]:
    """The cleaned prompt and the phrases to score; fails on bad input before any model work."""
    prompt = check_prompt(prompt)
    phrases = []
    if config.score == "phrase-mi":
        phrases = prompt_phrases(prompt, list(config.phrases) if config.phrases is not None else None)
    return prompt, phrases


def rerank(pipe: DiffusionPipeline, prompt: str, config: RerankConfig = RerankConfig(), *,
           progress: bool = True) -> list[Candidate]:
    """Sample ``config.n`` candidates of ``prompt`` and return them best first.

    Each candidate has its own seed (``candidate_seed``), so a candidate does not depend on N
    or the batch size, and best-of-4 is the best of the first 4 of best-of-16.
    """
    prompt, phrases = check_request(prompt, config)
    seeds = [candidate_seed(config.seed, prompt, c) for c in range(config.n)]
    images, mi, per_phrase = [], [], []
    bar = tqdm(total=config.n, unit="img", desc="rerank", disable=not progress, dynamic_ncols=True)
    for start in range(0, config.n, config.batch_size):
        batch = seeds[start : start + config.batch_size]
        samples = sample(pipe, [prompt] * len(batch), batch, config.sampling,
                         phrases=[phrases] * len(batch) if phrases else None)
        images += decode_latents(pipe, samples.latents)
        mi.append(samples.mi.cpu())
        if samples.phrase_mi is not None:
            per_phrase.append(samples.phrase_mi.cpu())
        bar.update(len(batch))
    bar.close()
    mi_all = torch.cat(mi)
    phrase_all = torch.cat(per_phrase) if per_phrase else torch.zeros(config.n, 0)
    scores = phrase_all.min(dim=1).values if phrases else mi_all
    ranks = rank_by_score(scores)
    candidates = [
        Candidate(index=c, seed=seeds[c], mi=mi_all[c].item(), score=scores[c].item(), rank=int(ranks[c]),
                  image=images[c], phrase_mi=dict(zip(phrases, phrase_all[c].tolist())))
        for c in range(config.n)
    ]
    return sorted(candidates, key=lambda cand: cand.rank)


def image_name(candidate: Candidate) -> str:
    return f"rank{candidate.rank:03d}_candidate{candidate.index:03d}.png"


def check_out(out_dir: str | Path, prompt: str) -> Path:
    """An output folder that holds anything but an earlier ranking of the same prompt is refused before the model
    loads: two prompts' images under one ranking.csv would be mixed up. Returns the folder."""
    out = Path(out_dir).expanduser()
    if not out.is_dir() or not any(out.iterdir()):
        return out
    request = out / REQUEST
    try:
        earlier = json.loads(request.read_text(encoding="utf-8"))["prompt"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(f"--out {out} is not empty and holds no ranking of a prompt ({REQUEST}); "
                              "choose an empty or new folder") from None
    if earlier != check_prompt(prompt):
        raise FileExistsError(f"--out {out} holds the ranking of another prompt ({earlier!r}); choose another "
                              "folder for this one")
    return out


def write_ranking(candidates: list[Candidate], out_dir: str | Path, prompt: str | None = None) -> Path:
    """Every image, named by rank and candidate, and ``ranking.csv`` (one row per image, best
    first, a ``phrase_mi[<phrase>]`` column per phrase); returns the table's path. With ``prompt``, the folder
    is first checked (``check_out``), an earlier ranking of the prompt replaced whole, and the prompt recorded
    in ``rerank.json``."""
    if prompt is not None:
        check_out(out_dir, prompt)
    out_dir = mio.check_writable(out_dir)
    if prompt is not None and (out_dir / TABLE).is_file():  # an earlier ranking of this prompt: its images go
        with open(out_dir / TABLE, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                name = Path(row.get("file_name") or "").name
                if name.endswith(".png"):
                    (out_dir / name).unlink(missing_ok=True)
    rows = []
    for cand in candidates:
        mio.write_png(out_dir / image_name(cand), cand.image)
        row = {"rank": cand.rank, "candidate": cand.index, "seed": cand.seed, "mi": cand.mi, "score": cand.score,
               "file_name": image_name(cand)}
        row.update({f"phrase_mi[{p}]": v for p, v in cand.phrase_mi.items()})
        rows.append(row)
    phrase_columns = [f"phrase_mi[{p}]" for p in candidates[0].phrase_mi] if candidates else []
    columns = ["rank", "candidate", "seed", "mi", "score", *phrase_columns, "file_name"]
    mio.write_text(out_dir / TABLE, mio.csv_text(rows, columns))
    if prompt is not None:
        mio.write_json(out_dir / REQUEST, {"prompt": check_prompt(prompt), "n": len(candidates)})
    return out_dir / TABLE
