"""Models: loading SD/SDXL pipelines, the tiny and full-size random-init ones the project builds itself,
and DoRA/LoRA adapters. The configs' ``_target_``s name the loaders through this package."""

from mitune.models.builders import build_tiny_pipeline
from mitune.models.loading import ModelLoadError, load_pipeline, tiny_default_pipeline

__all__ = ["ModelLoadError", "build_tiny_pipeline", "load_pipeline", "tiny_default_pipeline"]
