"""Shared test setup: nothing may reach the network, and tiny pipelines are built once."""

import os

# Read by huggingface_hub when it is first imported, so it must be set before any test imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A saved random-init SD pipeline (32 px images, 16-token prompts)."""
    from mitune.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), kind="sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A saved random-init SDXL pipeline (32 px images, 16-token prompts)."""
    from mitune.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), kind="sdxl")
