"""Models: loading SD/SDXL pipelines and knowing their weights, the tiny and full-size random-init ones the
project builds itself, and DoRA/LoRA adapters. The configs' ``_target_``s name the loaders through this package."""

from mitune.models.builders import build_tiny_pipeline
from mitune.models.loading import load_pipeline, model_weights, tiny_default_pipeline
from mitune.models.weights import ModelLoadError, Weights

__all__ = ["ModelLoadError", "Weights", "build_tiny_pipeline", "load_pipeline", "model_weights", "tiny_default_pipeline"]
