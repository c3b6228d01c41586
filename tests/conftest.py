"""Shared test setup: nothing may reach the network, and tiny pipelines are built once."""

import importlib.util
import os
import sys
from pathlib import Path

# Read by huggingface_hub when it is first imported, so it must be set before any test imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


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


@pytest.fixture(scope="module")
def load_benchmark():
    """``load_benchmark("gpu")``: benchmarks/gpu.py as a module (benchmarks/ is not a package). Each is
    registered in sys.modules while the test module runs, where dataclasses look their module up."""
    names = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        names.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in names:
        del sys.modules[name]
