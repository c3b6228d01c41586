"""Evaluation metrics: text-image alignment per image and image-set quality.

Metrics are built by name so configs and sweeps can choose them; each metric's module (and
its heavy dependencies) is imported only when that metric is built::

    from mitune.metrics import build_alignment_metric, load_image_folder
    images, prompts = load_image_folder("outputs/color/runs/<time>/rounds/round_1")
    scores = build_alignment_metric("blip_vqa", device="cuda").score(images, prompts)

See docs/metrics.md for each metric's default model and how it matches T2I-CompBench.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mitune.metrics.base import (
    AlignmentMetric,
    FeatureExtractor,
    ImageFiles,
    MetricInputError,
    QualityMetric,
    load_image_folder,
    load_images,
)
from mitune.metrics.hub import MissingModelError

_ALIGNMENT = {
    "mi": "mitune.metrics.mi:MIMetric",
    "clip_score": "mitune.metrics.clip_score:CLIPScoreMetric",
    "compbench_clip": "mitune.metrics.clip_score:CompBenchCLIPMetric",
    "blip_vqa": "mitune.metrics.blip_vqa:BlipVQAMetric",
    "hps": "mitune.metrics.hps:HPSMetric",
    "spatial": "mitune.metrics.spatial:SpatialMetric",
    "three_in_one": "mitune.metrics.three_in_one:ThreeInOneMetric",
    "toy_oracle": "mitune.toy.metric:ToyOracleMetric",  # the toy world owns its judge
    "toy_objects": "mitune.toy.metric:ToyObjectCountMetric",  # a diagnostic: objects drawn
    "mi_contrast": "mitune.metrics.mi:MIContrastMetric",  # MI with the prompt minus MI with swapped prompts
    "mi_contrast_standalone": "mitune.metrics.mi:StandaloneMIContrastMetric",  # the same on Eq. 2's estimator
}
_QUALITY = {
    "fid": "mitune.metrics.quality:FID",
    "fd_dino": "mitune.metrics.quality:FDDino",
    "cmmd": "mitune.metrics.quality:CMMD",
    "toy_fd": "mitune.toy.metric:ToyFD",  # the toy world's FID: renderer scenes as reference
}
ALIGNMENT_METRICS: tuple[str, ...] = tuple(_ALIGNMENT)
QUALITY_METRICS: tuple[str, ...] = tuple(_QUALITY)

# T2I-CompBench's evaluator per category (its repository's *_eval scripts); "compbench_clip" is
# CLIP ViT-B/32 cosine as they compute it, "three_in_one" their complex-category average.
CATEGORY_METRICS = {
    "color": "blip_vqa",
    "shape": "blip_vqa",
    "texture": "blip_vqa",
    "spatial": "spatial",
    "non_spatial": "compbench_clip",
    "complex": "three_in_one",
    "toy": "toy_oracle",  # the toy world (the embedded default), judged exactly
}


def _load(registry: dict[str, str], name: str, kind: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {kind} metric {name!r}; known: {', '.join(registry)}")
    module, cls = registry[name].split(":")
    return getattr(import_module(module), cls)


def build_alignment_metric(name: str, **kwargs: Any) -> AlignmentMetric:
    """An alignment metric by registry name; ``kwargs`` go to its constructor."""
    return _load(_ALIGNMENT, name, "alignment")(**kwargs)


def build_quality_metric(name: str, **kwargs: Any) -> QualityMetric:
    """A quality metric by registry name; ``kwargs`` go to its constructor."""
    return _load(_QUALITY, name, "quality")(**kwargs)


def quality_needs_reference(name: str) -> bool:
    """Whether a registry quality metric compares with given reference images (all but those that draw
    their own, ``toy_fd``); checked before any metric's model loads."""
    return _load(_QUALITY, name, "quality").needs_reference


def metric_for_category(category: str) -> str:
    """The alignment metric T2I-CompBench uses for a category (a name for ``build_alignment_metric``)."""
    if category not in CATEGORY_METRICS:
        raise MetricInputError(
            f"no metric for category {category!r}; known categories: {', '.join(CATEGORY_METRICS)}"
        )
    return CATEGORY_METRICS[category]


__all__ = [
    "ALIGNMENT_METRICS",
    "CATEGORY_METRICS",
    "QUALITY_METRICS",
    "AlignmentMetric",
    "FeatureExtractor",
    "ImageFiles",
    "MetricInputError",
    "MissingModelError",
    "QualityMetric",
    "build_alignment_metric",
    "build_quality_metric",
    "load_image_folder",
    "load_images",
    "metric_for_category",
    "quality_needs_reference",
]
