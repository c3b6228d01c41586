"""Loading SD 1.x/2.x and SDXL pipelines from a local folder or the hub, the tiny stand-in's cache, and the
weights a model config loads (``model_weights``), known before it loads."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from packaging.version import Version

from mitune.mi.pipeline import index_embedding, latent_shape, null_embedding, prediction_type, unet_eps_fn
from mitune.models.builders import build_once, build_tiny_pipeline
from mitune.models.weights import SKIPPED, Weights, is_local_path, local_folder, weights_of

# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype; older releases ignore `dtype`.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _from_pretrained(folder: Path, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    index = DiffusionPipeline.load_config(str(folder))
    # Skip loading the safety checker at all rather than load it and throw it away.
    skipped = {name: None for name in SKIPPED if name in index}
    no_checker = {**skipped, "requires_safety_checker": False} if skipped else {}
    return DiffusionPipeline.from_pretrained(str(folder), variant=variant, **{_DTYPE_KWARG: torch_dtype}, **no_checker)


def check_model_source(path_or_id: str) -> None:
    """Fails now on a local path that is not a diffusers pipeline folder (hub ids are found when loaded)."""
    if is_local_path(path_or_id):
        local_folder(path_or_id)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16, so configs can name dtypes as strings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown torch dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pipeline(
    path_or_id: str,
    *,
    torch_dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from a local directory or a hub id, without safety checker.

    A hub id loads from its cached snapshot (``mitune.models.weights.local_folder``: downloaded first where the hub
    answers); one that is neither cached nor downloadable fails at once, on one line.
    """
    path_or_id = str(path_or_id)
    pipe = _from_pretrained(local_folder(path_or_id, variant), resolve_dtype(torch_dtype), variant)
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"{path_or_id!r} is a {type(pipe).__name__}; only UNet-based SD/SDXL pipelines are supported")
    prediction_type(pipe)
    return pipe.to(resolve_device(device))


def tiny_folder(path_or_id: str | os.PathLike) -> Path:
    """The random-init stand-in's folder, built once (seeded; ``build_once``)."""
    return build_once(path_or_id, build_tiny_pipeline)


def tiny_default_pipeline(
    path_or_id: str | os.PathLike, *, torch_dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
) -> DiffusionPipeline:
    """The random-init stand-in (``model=tiny``): built once into the local dir ``path_or_id`` (``tiny_folder``),
    then loaded like any model. The argument is named as ``load_pipeline``'s, so every model config
    has the same ``model.path_or_id`` key."""
    return load_pipeline(str(tiny_folder(path_or_id)), torch_dtype=torch_dtype, device=device)


# Loaders that make their folder on first use: the folder is made before its weights are hashed.
FOLDER_MAKERS = {tiny_default_pipeline: tiny_folder}


def model_weights(model: Mapping[str, Any], cache_dir: str | os.PathLike) -> Weights:
    """The weights a model config (``cfg.model``, resolved) loads, ready before it loads: the tiny stand-in built,
    a hub id's snapshot found or downloaded, every weight file hashed. A task then loads exactly these with
    ``instantiate(cfg.model, path_or_id=str(weights.folder))``."""
    from hydra.utils import get_method

    make = FOLDER_MAKERS.get(get_method(model["_target_"]))
    variant = model.get("variant")
    folder = make(model["path_or_id"]) if make else local_folder(str(model["path_or_id"]), variant, "model.path_or_id")
    return weights_of(folder, variant, cache_dir)


def compile_unet(pipe: DiffusionPipeline, batch: int, backend: str = "inductor") -> float:
    """``torch.compile`` the UNet in place and compile it now, on a CFG batch of ``batch`` images;
    returns the seconds that took, for the log (minutes on SD-size UNets, paid once per process).

    Call it after adapters are fused: peft's adapter layers would split the graph.
    """
    unet = pipe.unet
    unet.compile(backend=backend)
    n = 2 * batch
    z = torch.zeros(latent_shape(pipe, n), device=unet.device)
    null = index_embedding(null_embedding(pipe), torch.zeros(n, dtype=torch.long, device=unet.device))
    start = time.perf_counter()
    with torch.no_grad():
        unet_eps_fn(pipe)(z, torch.full((n,), 999, device=unet.device), null)
    if unet.device.type == "cuda":
        torch.cuda.synchronize(unet.device)
    return time.perf_counter() - start


class LatentSpaceError(ValueError):
    """A generator whose latents the trained model could not read as its own."""


def _vae_config(folder: Path) -> dict[str, Any]:
    import json

    path = folder / "vae" / "config.json"
    if not path.is_file():
        raise LatentSpaceError(f"{folder} has no vae/config.json, so its latent space is unknown")
    config = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}  # _name_or_path, _diffusers_version


def check_latent_space(model: Weights, generator: Weights) -> None:
    """The generator's candidates are trained on as the model's own latents: both must use the same VAE (its config
    and the SHA-256 of its weight files), checked on the hashed files before either model loads."""
    def vae_files(weights: Weights) -> list[str]:
        return sorted(h for name, h in weights.files.items() if name.startswith("vae/"))

    ours, theirs = _vae_config(model.folder), _vae_config(generator.folder)
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise LatentSpaceError(f"the generator {generator.folder} has another VAE config than the model "
                               f"({', '.join(changed)}): its latents are not the model's; use a generator with the "
                               "model's VAE")
    if not vae_files(model) or vae_files(model) != vae_files(generator):
        raise LatentSpaceError(f"the generator {generator.folder} has other VAE weights than the model {model.folder} "
                               "(SHA-256 of vae/*.safetensors): its latents are not the model's; use a generator with "
                               "the model's VAE")
