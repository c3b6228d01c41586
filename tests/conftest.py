"""Shared test setup: nothing may reach the network, and tiny pipelines are built once."""

import importlib.util
import os
import sys
from pathlib import Path

# Read by huggingface_hub when it is first imported, so it must be set before any test imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A saved random-init SD pipeline (32 px images, 16-token prompts)."""
    from mitune.models.builders import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), kind="sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A saved random-init SDXL pipeline (32 px images, 16-token prompts)."""
    from mitune.models.builders import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), kind="sdxl")


@pytest.fixture(scope="session")
def task_config():
    """``task_config("config" | "evaluate", [overrides], output_dir)``: a task's config as ``python -m mitune.run``
    (or ``mitune.evaluate``) composes it, to call ``train(cfg)`` or ``evaluate(cfg)`` in this process: a subprocess
    pays seconds of imports per call and reports errors as stderr text instead of exceptions.

    Outside a Hydra app ``paths.output_dir`` (``${hydra:runtime.output_dir}``) has nothing to resolve from, so it is
    set to ``output_dir`` (an override of ``paths.output_dir`` still wins); sweep-only resolvers (W&B run name and
    group) give a single run's values."""
    from hydra import compose, initialize_config_dir

    import mitune.config

    mitune.config.register()  # the ${mitune.*} resolvers and the settings' defaults conf/ composes

    def make(name: str, overrides: list[str] | tuple[str, ...], output_dir: Path):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            return compose(name, overrides=[f"paths.output_dir={output_dir}", *overrides])

    return make


# A run small enough for a test: the smoke scale, 2 demo prompts, one round, CSV logs only.
SMALL_RUN = ["scale=smoke", "data=demo", "data.limit=2", "logger=csv", "rounds=1"]


@pytest.fixture(scope="session")
def config(task_config):
    """``config(run_dir, tiny, *overrides)``: a small run (``SMALL_RUN``) of the tiny model in ``run_dir``."""
    return lambda run_dir, tiny, *overrides: task_config(
        "config", ["model=tiny", f"model.path_or_id={tiny}", *SMALL_RUN, *overrides], run_dir)


@pytest.fixture
def round_dir(tiny_sd_path, tmp_path):
    """A finished generation round of the tiny model (2 prompts x 2 candidates) in ``tmp_path``:
    (folder, its settings, its GenerationConfig)."""
    from mitune.models.loading import load_pipeline
    from mitune.rounds.generation import round_settings
    from mitune.rounds.loop import run_round
    from mitune.rounds.settings import GenerationConfig

    pipe = load_pipeline(str(tiny_sd_path))
    prompts, generation = ["a red cube", "a blue ball"], GenerationConfig(num_candidates=2, num_inference_steps=2)
    run_round(pipe, prompts, generation, tmp_path, progress=False)
    return tmp_path, round_settings(pipe, prompts, generation), generation


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


@pytest.fixture
def single_thread():
    """MI loops run many small ops in sequence: one thread is faster and, unlike two, does not slow down ~10x
    when another process competes for the cores (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
