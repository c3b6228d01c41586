"""Evaluation task: ``python -m mitune.evaluate [+experiment=<grid>] run_dir=<run> eval.round=<r> generation.guidance_scale=<w>``.

One job evaluates one (model, round, CFG) point: the base model (``eval.round=0``) or the base
model plus the adapter a training run saved after round r (``<run_dir>/rounds/round_<r>/adapter``).
It generates N images per test prompt with a fixed seed list, scores them with the alignment
and quality metrics, and writes a tidy results table (method, category, round, cfg, metric,
value, n, ...) to the job dir and to W&B. With ``-m`` the jobs form the paper's grid
(``conf/evaluate.yaml``: rounds 0-3 x CFG 2.5/3.5/5.0/7.5); rounds are loaded, never retrained.

Generated images are cached under ``<run_dir>/eval/`` in a folder keyed by everything that
decides them (round, CFG, N, seed, prompts, model and generation settings, the base model's weights by
their SHA-256: ``mitune.models.weights``). They are written by
``mitune.rounds.generation.generate_round``, so a killed job resumes per prompt and a complete folder is
reused without loading the diffusion model. Every check on settings, paths, prompts, metrics
and reference sets runs before the first image is generated. A prompt source that gives each
prompt a category (the toy world) gets one row per category and metric; every row carries the
digest of the base weights (``weights``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# First: quiets library loggers before the imports below load them.
from mitune.runs.console import hydra_task, one_line_errors, quiet_libraries
from mitune.config import register, typed
from mitune.metrics import (
    QUALITY_METRICS,
    AlignmentMetric,
    MetricInputError,
    MissingModelError,
    QualityMetric,
    build_alignment_metric,
    build_quality_metric,
    load_image_folder,
    load_images,
    metric_for_category,
    quality_needs_reference,
)
from mitune.models.adapters import META_NAME, WEIGHTS_NAME, load_fused
from mitune.models.loading import compile_unet, model_weights
from mitune.models.weights import ModelLoadError, Weights
from mitune.prompts.sources import PromptSet, read_prompt_file
from mitune.rounds.generation import finish_round, generate_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RESULT_COLUMNS, RESULTS, SCORES, RoundDir, RunDir, check_inside, eval_images
from mitune.runs.record import WEIGHTS
from mitune.runs.io import check_writable, csv_text, sha256_file, write_jsonl, write_text
from mitune.runs.tracking import finish_wandb, make_loggers, run_config, save_hydra_files, start_wandb

log = logging.getLogger(__name__)
register()  # conf/ composes the settings' defaults and the ${mitune.*} resolvers

POOLED = "all"  # the category label of a row over every category's images (as mitune.summary pools alignment)
MI_SAMPLING = "mi_sampling"  # mean MI of the evaluated images, computed while sampling them (free)


@dataclass(frozen=True)
class EvalPoint:
    """What one evaluation job measures and how its rows are labelled."""

    round: int
    cfg: float
    num_images: int
    seed: int
    method: str
    category: str
    train_seed: int | None


# ----------------------------------------------------------------------------- checks


def check_point(point: EvalPoint) -> None:
    if isinstance(point.round, bool) or not isinstance(point.round, int) or point.round < 0:
        raise ValueError(f"eval.round must be an integer >= 0 (0 = base model), got {point.round!r}")
    if not math.isfinite(point.cfg) or point.cfg <= 0:
        raise ValueError(f"generation.guidance_scale (CFG) must be finite and > 0, got {point.cfg}")
    if point.num_images < 1:
        raise ValueError(f"eval.num_images must be >= 1, got {point.num_images}")


def adapter_for_round(run_dir: str | None, r: int) -> Path | None:
    """The adapter saved after round r of ``run_dir`` (None for r=0, the base model), checked to exist; a run_dir
    given is checked for round 0 too, whose images are cached in it."""
    if run_dir is not None and not RunDir(Path(run_dir)).path.is_dir():
        raise FileNotFoundError(f"run_dir {RunDir(Path(run_dir)).path} does not exist (a training run dir, e.g. "
                                "outputs/<task>/runs/<time>; leave run_dir out to evaluate the base model alone)")
    if r == 0:
        return None
    if run_dir is None:
        raise ValueError(f"eval.round={r} needs run_dir=<a training run dir>; without one only round 0 (the base model)")
    run = RunDir(Path(run_dir))
    trained = run.rounds_trained()
    if trained is not None and r > trained:
        raise ValueError(f"eval.round={r} but run {run.path} has trained {trained} round(s)")
    adapter = run.round(r).adapter
    for name in (WEIGHTS_NAME, META_NAME):
        if not (adapter / name).is_file():
            raise FileNotFoundError(f"run {run.path} has no adapter for round {r}: {adapter / name} is missing")
    return adapter


def run_record(run_dir: str | None) -> dict[str, Any]:
    """A training run's config record ({} without a run or a record)."""
    record = RunDir(Path(run_dir)).config_record if run_dir else None
    if record is None or not record.is_file():
        return {}
    return yaml.safe_load(record.read_text(encoding="utf-8")) or {}


def train_seed(run_dir: str | None) -> int | None:
    """The seed a training run was made with, from its config record (None without a run or a record)."""
    return run_record(run_dir).get("seed")


def check_base_weights(run_dir: str | None, path_or_id: str, weights: Weights) -> None:
    """The base model must be the one the run trained on, where its record says (records made before
    mitune recorded weights do not)."""
    trained_on = (run_record(run_dir).get(WEIGHTS) or {}).get("digest")
    if trained_on and trained_on != weights.digest:
        raise ValueError(f"run {run_dir} trained on base weights {trained_on} (key {WEIGHTS}.digest of its "
                         f"{RunDir(Path(run_dir)).config_record.name}), but model.path_or_id={path_or_id} has weights "
                         f"{weights.digest or 'without safetensors files'}; evaluate with the run's base model")


def eval_prompts(cfg: DictConfig) -> PromptSet:
    """``eval.prompt_file``, else the training prompt source's ``eval.split`` (T2I-CompBench: val) where it has splits."""
    if cfg.eval.prompt_file:
        return read_prompt_file(cfg.eval.prompt_file, cfg.data.get("limit"))
    extra = {"split": cfg.eval.split} if "split" in cfg.data and cfg.eval.split else {}
    return instantiate(cfg.data, **extra)


# ----------------------------------------------------------------------------- metrics


def _build(name: str, kwargs: dict[str, Any], kind: str):
    """A registry metric, or one's own class when the kwargs name a ``_target_``.

    Nested ``_target_`` nodes (e.g. a feature extractor) are instantiated first.
    """
    if "_target_" in kwargs:
        return instantiate(kwargs, _convert_="all")
    built = instantiate(OmegaConf.create(kwargs), _convert_="all") if kwargs else {}
    return (build_alignment_metric if kind == "alignment" else build_quality_metric)(name, **built)


def alignment_names(cfg: DictConfig, category: str) -> list[str]:
    """``eval.alignment`` or, when null, the T2I-CompBench metric of the category."""
    if cfg.eval.alignment is not None:
        return list(cfg.eval.alignment)
    try:
        return [metric_for_category(category)]
    except MetricInputError as err:
        raise MetricInputError(f"{err}; set eval.alignment=[<metric>, ...] to choose metrics yourself") from err


def build_metrics(cfg: DictConfig, category: str) -> tuple[dict[str, AlignmentMetric], dict[str, QualityMetric]]:
    kwargs = OmegaConf.to_container(cfg.eval.metric_kwargs, resolve=True) or {}
    alignment = {name: _build(name, kwargs.get(name, {}), "alignment") for name in alignment_names(cfg, category)}
    quality = {name: _build(name, kwargs.get(name, {}), "quality") for name in cfg.eval.quality}
    return alignment, quality


def check_metric_inputs(alignment: dict[str, AlignmentMetric], quality: dict[str, QualityMetric],
                        prompts: list[str], num_images: int, reference: str | None,
                        categories: list[str] | None = None, seed: int = 0) -> None:
    """Prompts each metric can parse, and enough images on both sides of every quality metric (per category
    for a metric that draws its own reference: each category is compared on its own)."""
    for metric in alignment.values():
        metric.check_prompts(prompts)
    external = [name for name, metric in quality.items() if metric.needs_reference]
    if external and not reference:
        raise MetricInputError(f"quality metrics {external} need eval.reference=<folder of reference images>")
    count = len(load_images(reference)) if external else 0  # verifies every file, so an unreadable image fails here
    smallest = min(Counter(categories or [""] * len(prompts)).values(), default=0) * num_images
    for name, metric in quality.items():
        if not metric.needs_reference:
            metric.reference_for(prompts, seed)  # a prompt it cannot draw fails here, before any image
        sides = ((("reference images", count), ("generated images", len(prompts) * num_images)) if metric.needs_reference
                 else (("generated images of a category", smallest),))
        for what, have in sides:
            if have < metric.min_samples:
                raise MetricInputError(f"{name} needs at least {metric.min_samples} {what}, got {have}"
                                       + (f" in {reference}" if what.startswith("reference") else
                                          f" ({len(prompts)} prompts x eval.num_images={num_images})"))


# ----------------------------------------------------------------------------- images


def settings_key(prompts: list[str], generation: GenerationConfig, model: dict[str, Any], adapter: Path | None) -> str:
    """Short hash of everything besides round/CFG/N/seed that decides the images.

    The adapter enters by content, so a retrained round never reuses the old round's images (the base
    model too: ``model`` holds its weights' digest).
    """
    weights = sha256_file(adapter / WEIGHTS_NAME) if adapter else None
    blob = json.dumps({"prompts": prompts, "generation": asdict(generation), "model": model, "adapter": weights},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ensure_images(cfg: DictConfig, folder: RoundDir, prompts: list[str], generation: GenerationConfig,
                  adapter: Path | None, weights: Weights) -> RoundDir:
    """Generate the job's images unless a complete folder is cached; resumes a partial one.

    One writer at a time: a second job for the same folder (another selection's round 0 in a parallel
    sweep) waits for the first, then reuses its images.
    """
    folder.path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.lock)):
        if folder.is_complete():
            log.info("using cached images in %s", folder.path)
            return folder
        generate_images(cfg, folder, prompts, generation, adapter, weights)
    return folder


def generate_images(cfg: DictConfig, folder: RoundDir, prompts: list[str], generation: GenerationConfig,
                    adapter: Path | None, weights: Weights) -> None:
    pipe = instantiate(cfg.model, path_or_id=str(weights.folder))  # the weights the images are keyed by
    if adapter is not None:
        load_fused(pipe, adapter)
    pipe.unet.eval()
    if cfg.eval.compile:
        backend = "inductor" if cfg.eval.compile is True else str(cfg.eval.compile)
        batch = min(generation.micro_batch, len(prompts) * generation.num_candidates)
        seconds = compile_unet(pipe, batch, backend=backend)
        log.info("torch.compile (%s) of the UNet took %.1f s", backend, seconds)
    generate_round(pipe, prompts, generation, folder, leave=False)  # a sweep's console keeps one line per job
    finish_round(folder, len(prompts))


# ----------------------------------------------------------------------------- scoring and results


def quality_groups(categories: list[str]) -> dict[str, list[int]]:
    """The images each quality row compares: every category's, and all of them as ``all`` where they span
    several (the label ``mitune.summary`` pools alignment under, so the two meet per category and pooled)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        groups[category].append(i)
    if len(groups) > 1:
        groups[POOLED] = list(range(len(categories)))
    return dict(groups)


def score(folder: RoundDir, alignment: dict[str, AlignmentMetric], quality: dict[str, QualityMetric],
          reference: str | None, categories: list[str], seed: int
          ) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], tuple[float, int]]]:
    """Per-image alignment scores, and per (category, quality metric) the distance and its image count.

    A metric with an external reference compares the whole set with it (one row: the job's only category,
    or ``all``); one that draws its own (``toy_fd``) compares each category with its prompts' references.
    """
    images, prompts = load_image_folder(folder.path)
    per_image = {name: metric.score(images, prompts) for name, metric in alignment.items()}
    distances: dict[tuple[str, str], tuple[float, int]] = {}
    groups = quality_groups(categories)
    for name, metric in quality.items():
        features = metric.features(images, "images")
        if metric.needs_reference:
            label = categories[0] if len(groups) == 1 else POOLED
            distances[(label, name)] = (metric.compare(features, metric.features(load_images(reference), "reference")),
                                        len(images))
            continue
        drawn = metric.features(metric.reference_for(prompts, seed), "reference")
        for label, index in groups.items():
            distances[(label, name)] = (metric.compare(features[index], drawn[index]), len(index))
    return per_image, distances


def result_rows(point: EvalPoint, per_image: dict[str, torch.Tensor], distances: dict[tuple[str, str], tuple[float, int]],
                mi: torch.Tensor, categories: list[str], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The tidy table: one row per category and metric (alignment: mean over the category's images,
    std across them); quality rows as ``score`` made them."""
    base = {"method": point.method, "round": point.round, "cfg": point.cfg, "images_per_prompt": point.num_images,
            "seed": point.seed, "train_seed": point.train_seed, **meta}
    rows = []
    for category in dict.fromkeys(categories):
        mine = torch.tensor([c == category for c in categories])
        for name, kind, s in [*((n, "alignment", s) for n, s in per_image.items()), (MI_SAMPLING, "mi", mi)]:
            s = s[mine]
            rows.append({**base, "category": category, "metric": name, "kind": kind, "value": s.mean().item(),
                         "std": s.std().item() if len(s) > 1 else 0.0, "n": len(s),
                         "num_prompts": len(s) // point.num_images})
    rows += [{**base, "category": category, "metric": name, "kind": "quality", "value": value, "std": None,
              "n": n, "num_prompts": n // point.num_images} for (category, name), (value, n) in distances.items()]
    return rows


def write_results(out_dir: Path, rows: list[dict[str, Any]], metadata: list[dict[str, Any]],
                  per_image: dict[str, torch.Tensor]) -> Path:
    """results.csv (the tidy table) and scores.jsonl (every image's metadata and scores), atomically."""
    scored = [{**row, **{name: s[i].item() for name, s in per_image.items()}} for i, row in enumerate(metadata)]
    write_jsonl(out_dir / SCORES, scored)
    write_text(out_dir / RESULTS, csv_text(rows, RESULT_COLUMNS))
    return out_dir / RESULTS


def point_metrics(point: EvalPoint, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The job's point as W&B summary metrics: ``eval/<category>/<metric>`` plus ``eval/round`` and ``eval/cfg``,
    so a scatter panel over a sweep's group (x: a quality metric, y: an alignment metric) draws the trade-off."""
    return {**{f"eval/{row['category']}/{row['metric']}": row["value"] for row in rows},
            "eval/round": point.round, "eval/cfg": point.cfg}


def log_results(cfg: DictConfig, point: EvalPoint, rows: list[dict[str, Any]]) -> str | None:
    """The point's metrics (W&B: summary metrics, with round and CFG in the config) and the rows as a W&B
    table (offline without an API key); returns where the W&B run is (None without W&B)."""
    if "wandb" in cfg.logger:
        OmegaConf.update(cfg, "logger.wandb.name", f"{cfg.task_name}-eval-r{point.round}-cfg{point.cfg:g}")
    loggers = make_loggers(cfg)
    where = start_wandb(loggers, say=False)  # said in the job's one line
    try:
        for logger in loggers:
            logger.log_hyperparams({**run_config(cfg), "round": point.round, "cfg": point.cfg, "method": point.method})
            logger.log_metrics(point_metrics(point, rows), step=0)
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table("eval/results", columns=RESULT_COLUMNS,
                                 data=[[row[c] for c in RESULT_COLUMNS] for row in rows])
            logger.save()
    finally:
        finish_wandb()
    return where


def headline(rows: list[dict[str, Any]]) -> str:
    """The job's console summary: each metric over all its images (``all`` where the job spans categories,
    whose means are pooled here as mitune.summary pools them); the per-category rows are in the table."""
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_metric[row["metric"]].append(row)
    parts = []
    for name, mine in by_metric.items():
        pooled = [row for row in mine if row["category"] == POOLED] or mine
        value = sum(row["value"] * row["n"] for row in pooled) / sum(row["n"] for row in pooled)
        parts.append(f"{name} {value:.4g}")
    categories = {row["category"] for row in rows} - {POOLED}
    return ", ".join(parts) + (f" (all {len(categories)} categories)" if len(categories) > 1 else "")


def eval_point(cfg: DictConfig) -> EvalPoint:
    method = str(cfg.eval.method)
    if not re.fullmatch(r"[\w.+-]+", method):
        raise ValueError(f"eval.method must be a plain name (letters, digits, _.+-), got {method!r}")
    return EvalPoint(round=cfg.eval.round, cfg=float(cfg.generation.guidance_scale), num_images=int(cfg.eval.num_images),
                     seed=int(cfg.eval.seed), method=method, category=str(cfg.eval.category),
                     train_seed=train_seed(cfg.run_dir))


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Checks everything, then generates (or reuses) the images, scores them and writes the results."""
    point = eval_point(cfg)
    check_point(point)
    adapter = adapter_for_round(cfg.run_dir, point.round)
    prompt_set = eval_prompts(cfg)
    prompts = prompt_set.prompts
    # Nothing is selected: selection and top_k are fixed so that they play no part in the images' cache key;
    # nothing is pruned either (every image is scored).
    generation = replace(typed(cfg.generation, GenerationConfig, "generation"), num_candidates=point.num_images, top_k=1,
                         seed=point.seed, selection="mi", prune=())
    out_dir = check_writable(Path(cfg.paths.output_dir))
    # Registry metrics that need a reference folder are checked before any is built (a built FID loads Inception).
    external = [name for name in cfg.eval.quality if name in QUALITY_METRICS and quality_needs_reference(name)]
    if external and not cfg.eval.reference:
        raise MetricInputError(f"quality metrics {external} need eval.reference=<folder of reference images>")
    alignment, quality = build_metrics(cfg, point.category)
    check_metric_inputs(alignment, quality, prompts, point.num_images, cfg.eval.reference, prompt_set.categories,
                        point.seed)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    weights = model_weights(model, cfg.paths.cache_dir)  # found (downloaded where not cached) and hashed, not loaded
    check_base_weights(cfg.run_dir, str(model["path_or_id"]), weights)
    model["weights"] = weights.digest  # other weights under the same id make other images
    if cfg.eval.compile:  # compiled kernels round differently: keep their images apart
        model["compile"] = cfg.eval.compile
    root = Path(cfg.eval.image_root or (RunDir(Path(cfg.run_dir)).eval_root if cfg.run_dir else out_dir / "images")).expanduser()
    if cfg.run_dir and not cfg.eval.image_root:
        check_inside(Path(cfg.run_dir), root)  # a linked eval/ would write into another folder
    save_hydra_files(cfg, out_dir)
    folder = ensure_images(cfg, eval_images(root, point.round, point.cfg, point.num_images, point.seed,
                                           settings_key(prompts, generation, model, adapter)), prompts,
                           generation, adapter, weights)
    try:
        metadata = folder.rows()
    except (OSError, ValueError) as err:  # a cached folder damaged since it was written
        raise MetricInputError(f"{err}; delete {folder.path} to generate its images again") from err
    categories = [(prompt_set.categories or [point.category] * len(prompts))[row["prompt_id"]] for row in metadata]
    per_image, distances = score(folder, alignment, quality, cfg.eval.reference, categories, point.seed)
    meta = {"num_prompts": len(prompts), "model": str(model["path_or_id"]), "weights": weights.digest,
            "run_dir": str(cfg.run_dir or ""), "image_dir": str(folder.path)}
    rows = result_rows(point, per_image, distances, torch.tensor([row["mi"] for row in metadata]), categories, meta)
    # Each image's category travels with its scores: paired contrasts (mitune.contrasts) split by it.
    scored = [{**row, "category": category} for row, category in zip(metadata, categories)]
    path = write_results(out_dir, rows, scored, per_image)
    where = log_results(cfg, point, rows)
    print(f"mitune.evaluate: round {point.round}, CFG {point.cfg:g}: {headline(rows)}; table in {path}"
          + (f"; {where}" if where else ""))
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    quiet_libraries()
    with one_line_errors("mitune.evaluate", ModelLoadError, MissingModelError):
        rows = evaluate(cfg)
    return float(rows[0]["value"])


if __name__ == "__main__":
    hydra_task(main, "mitune.evaluate")
