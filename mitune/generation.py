"""MI-scored generation round (Algorithm 1's inner loop), resumable and reproducible.

For every prompt, M candidates are sampled with ``sample_with_mi`` and the top-k by MI (or by
another ``selection`` score: phrase MI, chance, any alignment metric) are marked as the
fine-tuning set. The round is written as a ``mitune.artifacts.RoundDir`` (a Hugging Face
``imagefolder``); its rows hold file_name, prompt, prompt_id, candidate, seed, mi, score (what
selection ranked by), rank, selected and latents.

A prompt is committed only after its images and latents are on disk, so a round killed
at any point resumes without losing or duplicating work. Each candidate has its own seed
and generator, and micro-batches are cut from the full job list the same way on every run,
so a resumed round is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from mitune import io as mio
from mitune.artifacts import RoundDir, as_round_dir
from mitune.mi import MIConfig, sample_with_mi
from mitune.mi_maps import overlay
from mitune.models import (
    ddpm_scheduler,
    decode_latents,
    encode_prompts,
    index_embedding,
    latent_shape,
    null_embedding,
    unet_eps_fn,
)
from mitune.phrase_mi import min_phrase_mi, rest_embeddings, sample_with_phrase_mi
from mitune.seeds import mix_seed
from mitune.selection import check_strategy, check_top_k, select_top_k, selection_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """One round's sampling and selection settings.

    The defaults are the paper's (Algorithm 1): M=50 candidates, top-1 by MI, CFG 7.5, 50 DDPM
    steps with sigma_t^2 = beta_t, a distinct seed per (prompt, candidate). They are written only
    here: ``conf/generation/paper.yaml`` composes them (see ``mitune.config``).
    """

    num_candidates: int = 50
    top_k: int = 1
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    micro_batch: int = 50
    seed: int = 0
    seed_mode: str = "per_prompt"  # or "shared"
    variance_type: str = "fixed_large"
    # Algorithm 2 adds no noise at the last step; True adds it as diffusers' DDPM does at t=1.
    last_step_noise: bool = False
    # Also keep each candidate's MI map: "mi_maps" in the latents file and an overlay PNG.
    save_mi_maps: bool = False
    # Rank candidates by: mi (MI-TUNE), phrase_mi (smallest per-phrase conditional MI; P more
    # UNet rows per step for P phrases), random (the control) or an alignment metric's name
    # (mitune.selection; toy_oracle is the toy world's upper bound).
    selection: str = "mi"
    mi: MIConfig = field(default_factory=MIConfig)

    def __post_init__(self) -> None:
        check_top_k(self.num_candidates, self.top_k)
        check_strategy(self.selection)
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.seed_mode not in ("per_prompt", "shared"):
            raise ValueError(f"seed_mode must be 'per_prompt' or 'shared', got {self.seed_mode!r}")
        if self.variance_type not in ("fixed_large", "fixed_small"):
            raise ValueError(f"variance_type must be 'fixed_large' or 'fixed_small', got {self.variance_type!r}")
        if self.save_mi_maps and self.selection == "phrase_mi":
            raise ValueError("save_mi_maps is not available with selection=phrase_mi")


def candidate_seed(base_seed: int, prompt: str, candidate: int, mode: str = "per_prompt") -> int:
    """Seed of one candidate: stable across runs, prompt order and M.

    ``shared`` gives every prompt the same M seeds, as the authors' public code does.
    """
    if mode == "shared":
        return base_seed + candidate
    return mix_seed(base_seed, candidate, prompt)


@dataclass(frozen=True)
class Job:
    prompt_id: int
    candidate: int
    seed: int


@dataclass
class RoundSummary:
    """What a round produced, for logs and the next stage."""

    round_dir: Path
    num_prompts: int
    num_images: int
    mean_mi: float
    median_mi: float
    mean_selected_mi: float
    selection_margin: float

    def stats(self) -> dict[str, float]:
        """The figures alone (no path), so identical rounds write identical files."""
        return {k: v for k, v in asdict(self).items() if k != "round_dir"}


def make_jobs(prompts: list[str], config: GenerationConfig) -> list[Job]:
    return [
        Job(pid, c, candidate_seed(config.seed, prompt, c, config.seed_mode))
        for pid, prompt in enumerate(prompts)
        for c in range(config.num_candidates)
    ]


def round_settings(pipe: DiffusionPipeline, prompts: list[str], config: GenerationConfig) -> dict[str, Any]:
    """Everything that determines the round's output; a resume must reproduce it exactly."""
    prompts_hash = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "model": str(pipe.config._name_or_path),
        "dtype": str(pipe.unet.dtype),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_hash,
        "generation": json.loads(json.dumps(asdict(config))),
    }


def check_settings(round_dir: RoundDir, settings: dict[str, Any]) -> bool:
    """Whether the settings file exists; if it does, it must hold exactly ``settings``."""
    settings_file = round_dir.settings_file
    if not settings_file.exists():
        return False
    try:
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{settings_file} is corrupt ({err}); delete the round dir {round_dir.path} to regenerate it") from err
    if previous != settings:
        changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
        raise ValueError(
            f"{round_dir.path} holds a round made with different settings ({', '.join(changed)}); "
            "resume with the same settings or choose a new output dir"
        )
    return True


def prepare_round_dir(round_dir: RoundDir, settings: dict[str, Any], write: bool = True) -> set[int]:
    """Create or reopen a round dir; returns the prompt ids already committed.

    Only one rank writes the settings file; the others check it when it is there.
    """
    if not check_settings(round_dir, settings) and write:
        mio.write_json(round_dir.settings_file, settings)
    return round_dir.done_prompts()


def verify_round(round_dir: RoundDir | Path, settings: dict[str, Any], num_prompts: int, num_candidates: int) -> None:
    """Check a finished round before it is reused: its settings, every row, and the selected files.

    A ``metadata.jsonl`` that lost rows is rebuilt from the per-prompt ``parts/`` (what it was made
    from); a missing part, latents file or selected image is an error naming it.
    """
    round_dir = as_round_dir(round_dir)
    if not check_settings(round_dir, settings):
        raise FileNotFoundError(f"finished round {round_dir.path} has no {round_dir.settings_file.name}; delete the "
                                "round dir to regenerate it")
    expected = num_prompts * num_candidates
    try:
        rows = round_dir.rows()
    except (OSError, ValueError) as err:
        rows, reason = [], str(err)
    else:
        reason = f"{len(rows)} rows, expected {num_prompts} prompts x {num_candidates} = {expected}"
    if len(rows) != expected:
        missing = [pid for pid in range(num_prompts) if not round_dir.part(pid).is_file()]
        if missing:
            raise ValueError(f"{round_dir.metadata} is damaged ({reason}) and {round_dir.part(missing[0])} is "
                             "missing too; delete the round dir to regenerate the round")
        log.warning("%s was damaged (%s); rebuilt it from its parts", round_dir.metadata, reason)
        finish_round(round_dir, num_prompts)
        rows = round_dir.rows()
    for row in rows:
        for name in ([row["latents"], row["file_name"]] if row["selected"] else [row["latents"]]):
            if not (round_dir.path / name).is_file():
                raise FileNotFoundError(f"{round_dir.path / name} is missing; restore it, or delete the round dir "
                                        f"{round_dir.path} to regenerate the round")


@torch.no_grad()
def generate_batch(
    pipe: DiffusionPipeline, prompts: list[str], jobs: list[Job], config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Sample one micro-batch; one text-encoder pass per distinct prompt in it.

    Returns latents, MI and extras per candidate: "mi_map" (``save_mi_maps``) or "phrase_mi",
    the smallest per-phrase MI (``selection="phrase_mi"``, P more UNet rows per step)."""
    device = pipe.unet.device
    unique_ids = sorted({j.prompt_id for j in jobs})
    position = {pid: i for i, pid in enumerate(unique_ids)}
    emb = encode_prompts(pipe, [prompts[pid] for pid in unique_ids])
    emb = index_embedding(emb, torch.tensor([position[j.prompt_id] for j in jobs], device=device))
    null = index_embedding(null_embedding(pipe), torch.zeros(len(jobs), dtype=torch.long, device=device))
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    z_T = randn_tensor(latent_shape(pipe, len(jobs)), generator=generators, device=device, dtype=torch.float32)
    sampling = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    generator=generators, config=config.mi, last_step_noise=config.last_step_noise)
    scheduler = ddpm_scheduler(pipe, config.variance_type)
    if config.selection == "phrase_mi":
        rests, valid = rest_embeddings(pipe, [prompts[j.prompt_id] for j in jobs])
        z, mi, per_phrase = sample_with_phrase_mi(unet_eps_fn(pipe), z_T, emb, null, rests, scheduler, **sampling)
        return z, mi, [{"phrase_mi": v} for v in min_phrase_mi(per_phrase, valid).tolist()]
    out = sample_with_mi(unet_eps_fn(pipe), z_T, emb, null, scheduler, **sampling, return_map=config.save_mi_maps)
    if config.save_mi_maps:
        return out[0], out[1], [{"mi_map": m} for m in out[2].cpu()]
    return out[0], out[1], [{} for _ in jobs]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, image: Image.Image) -> None:
    data = png_bytes(image)
    mio.atomic_write(path, lambda tmp: tmp.write_bytes(data))


Result = tuple[torch.Tensor, Image.Image, float, dict[str, Any]]
"""One candidate's latents, image, MI and extras (see ``generate_batch``)."""


def commit_prompt(
    round_dir: RoundDir, prompt: str, jobs: list[Job], results: dict[int, Result], config: GenerationConfig,
) -> None:
    """Write one prompt's images and latents, then its rows (the commit marker)."""
    pid = jobs[0].prompt_id
    latents = torch.stack([results[j.candidate][0] for j in jobs])
    mi = torch.tensor([results[j.candidate][2] for j in jobs], dtype=torch.float32)
    generator = torch.Generator().manual_seed(mix_seed(config.seed, "select", prompt))
    phrase_mi = None
    if config.selection == "phrase_mi":
        phrase_mi = torch.tensor([results[j.candidate][3]["phrase_mi"] for j in jobs], dtype=torch.float64)
    scores = selection_scores(config.selection, prompt, [results[j.candidate][1] for j in jobs], mi, generator,
                              phrase_mi)
    ranks, selected = select_top_k(scores, config.top_k)
    latents_name = round_dir.latents_name(pid)
    tensors = {"latents": latents, "mi": mi}
    if config.save_mi_maps:
        tensors["mi_maps"] = torch.stack([results[j.candidate][3]["mi_map"] for j in jobs])
        for j in jobs:
            _, image, _, extras = results[j.candidate]
            write_png(round_dir.path / round_dir.mi_map_name(pid, j.candidate), overlay(image, extras["mi_map"]))
    mio.write_safetensors(round_dir.path / latents_name, tensors, {"prompt": prompt})
    rows = []
    for j, score, rank, sel in zip(jobs, scores.tolist(), ranks.tolist(), selected.tolist()):
        file_name = round_dir.image_name(pid, j.candidate)
        write_png(round_dir.path / file_name, results[j.candidate][1])
        rows.append({
            "file_name": file_name, "prompt": prompt, "prompt_id": pid, "candidate": j.candidate,
            "seed": j.seed, "mi": results[j.candidate][2], "score": score, "rank": rank, "selected": sel,
            "latents": latents_name,
        })
    mio.write_jsonl(round_dir.part(pid), rows)


def finish_round(round_dir: RoundDir | Path, num_prompts: int) -> RoundSummary:
    """Merge per-prompt rows into the imagefolder metadata and summarise MI; the summary, written
    last, marks the folder complete."""
    round_dir = as_round_dir(round_dir)
    rows = [row for pid in range(num_prompts) for row in mio.read_jsonl(round_dir.part(pid))]
    mio.write_jsonl(round_dir.metadata, rows)
    mi = torch.tensor([r["mi"] for r in rows], dtype=torch.float64)
    selected = torch.tensor([r["selected"] for r in rows])
    rest = mi[~selected]
    summary = RoundSummary(
        round_dir=round_dir.path,
        num_prompts=num_prompts,
        num_images=len(rows),
        mean_mi=mi.mean().item(),
        median_mi=mi.median().item(),
        mean_selected_mi=mi[selected].mean().item(),
        selection_margin=(mi[selected].mean() - rest.mean()).item() if len(rest) else 0.0,
    )
    mio.write_json(round_dir.summary_file, summary.stats())
    log.info("round done: %d prompts, %d images, mean MI %.4g, selected %.4g -> %s",
             summary.num_prompts, summary.num_images, summary.mean_mi, summary.mean_selected_mi, round_dir.path)
    return summary


def micro_batches(jobs: list[Job], micro_batch: int) -> list[list[Job]]:
    """Cut the job list into full micro-batches (only the last may be short); a prompt may
    straddle two batches.

    The cut depends only on (prompts, M, micro_batch), so every run, resume and rank computes
    each batch identically; ``rank_batches`` keeps each prompt on one rank.
    """
    return [jobs[i : i + micro_batch] for i in range(0, len(jobs), micro_batch)]


def rank_batches(batches: list[list[Job]], rank: int, world_size: int) -> list[list[Job]]:
    """Rank ``rank``'s share of the batches: every world_size-th group of batches chained by the
    prompts they share, so each prompt is generated whole by one rank (a prompt is committed only
    with all its M candidates; split between ranks, it never would be). A group holds
    lcm(M, micro_batch) jobs: one batch or one prompt when either divides the other."""
    groups: list[list[list[Job]]] = []
    for batch in batches:
        if groups and groups[-1][-1][-1].prompt_id == batch[0].prompt_id:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [batch for group in groups[rank::world_size] for batch in group]


def run_round(
    pipe: DiffusionPipeline,
    prompts: list[str],
    config: GenerationConfig,
    round_dir: RoundDir | str | Path,
    *,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    stop: Callable[[], None] | None = None,
) -> RoundSummary | None:
    """Generate, score and select for every prompt; resumes a partly done ``round_dir``.

    With ``world_size`` > 1, rank r takes every world_size-th micro-batch (whole prompts) and writes its
    prompts into the shared ``round_dir``; the caller synchronises the ranks and then calls
    ``finish_round`` once. Returns the summary when ``world_size`` is 1, else None. ``stop`` is called
    before each micro-batch and may raise to end the round early (finished prompts are kept).
    """
    check_strategy(config.selection, prompts)
    round_dir = as_round_dir(round_dir)
    mio.check_writable(round_dir.path)
    done = prepare_round_dir(round_dir, round_settings(pipe, prompts, config), write=rank == 0)
    jobs = make_jobs(prompts, config)
    batches = rank_batches(micro_batches(jobs, config.micro_batch), rank, world_size)
    mine = [j for batch in batches for j in batch]
    jobs_by_prompt = {pid: jobs[pid * config.num_candidates : (pid + 1) * config.num_candidates] for pid in range(len(prompts))}
    pending: dict[int, dict[int, Result]] = {}
    # One tick per micro-batch, rate averaged over the whole round (smoothing=0): a true ETA from the first tick.
    bar = tqdm(total=len(mine), initial=sum(j.prompt_id in done for j in mine), unit="img", smoothing=0,
               desc=f"{round_dir.name} generate" + (f" (rank {rank})" if world_size > 1 else ""),
               disable=not progress, dynamic_ncols=True)
    for batch in batches:
        if all(j.prompt_id in done for j in batch):
            continue
        if stop is not None:
            stop()
        latents, mi, extras = generate_batch(pipe, prompts, batch, config)
        images = decode_latents(pipe, latents)
        bar.update(sum(j.prompt_id not in done for j in batch))
        for j, z0, image, score, extra in zip(batch, latents.float().cpu(), images, mi.tolist(), extras):
            if j.prompt_id in done:
                continue
            results = pending.setdefault(j.prompt_id, {})
            results[j.candidate] = (z0, image, score, extra)
            if len(results) == config.num_candidates:
                commit_prompt(round_dir, prompts[j.prompt_id], jobs_by_prompt[j.prompt_id], results, config)
                done.add(j.prompt_id)
                del pending[j.prompt_id]
    bar.close()
    if world_size > 1:
        return None
    return finish_round(round_dir, len(prompts))
