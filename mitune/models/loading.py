"""Loading SD 1.x/2.x and SDXL pipelines from a local folder or the hub, and the tiny stand-in's cache."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from huggingface_hub.errors import HFValidationError
from packaging.version import Version

from mitune.mi.pipeline import index_embedding, latent_shape, null_embedding, prediction_type, unet_eps_fn
from mitune.models.builders import build_once, build_tiny_pipeline

# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype; older releases ignore `dtype`.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


class ModelLoadError(OSError):
    """A hub id could not be loaded: offline, not cached, gated or misspelt."""



def _is_local_path(value: str) -> bool:
    """'/x', './x', '~/x', existing paths and 'a/b/c' are paths; 'org/name' and 'name' are hub ids.

    Decided by form rather than existence, so a mistyped path fails as a missing path and never
    goes to the hub.
    """
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return True
    return os.sep in value and not _HUB_ID.fullmatch(value)


def _from_pretrained(source: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    index = DiffusionPipeline.load_config(source)
    # Skip loading the safety checker at all rather than load it and throw it away.
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    return DiffusionPipeline.from_pretrained(source, variant=variant, **{_DTYPE_KWARG: torch_dtype}, **no_checker)


def check_model_source(path_or_id: str) -> None:
    """Fails now on a local path that is not a diffusers pipeline folder (hub ids fail when loaded)."""
    if not _is_local_path(path_or_id):
        return
    path = Path(path_or_id).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path_or_id!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model path {path_or_id!r} has no model_index.json; expected a diffusers pipeline directory"
        )


def _load_local(path_or_id: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    check_model_source(path_or_id)
    return _from_pretrained(str(Path(path_or_id).expanduser()), torch_dtype, variant)


def _load_hub(hub_id: str, torch_dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    try:
        return _from_pretrained(hub_id, torch_dtype, variant)
    except (OSError, HFValidationError) as err:
        raise ModelLoadError(
            f"could not load model {hub_id!r} from the Hugging Face hub or the local cache, and no local "
            f"directory of that name exists ({err}); download it first or pass a local diffusers directory instead"
        ) from err


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
    """Load an SD 1.x/2.x or SDXL pipeline from a local directory or a hub id, without safety checker."""
    path_or_id = str(path_or_id)
    load = _load_local if _is_local_path(path_or_id) else _load_hub
    pipe = load(path_or_id, resolve_dtype(torch_dtype), variant)
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"{path_or_id!r} is a {type(pipe).__name__}; only UNet-based SD/SDXL pipelines are supported")
    prediction_type(pipe)
    return pipe.to(resolve_device(device))


def tiny_default_pipeline(
    path_or_id: str | os.PathLike, *, torch_dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
) -> DiffusionPipeline:
    """The random-init stand-in (``model=tiny``): built once (seeded) into the local dir ``path_or_id``,
    then loaded like any model. The argument is named as ``load_pipeline``'s, so every model config
    has the same ``model.path_or_id`` key.
    """
    path = build_once(path_or_id, build_tiny_pipeline)
    return load_pipeline(str(path), torch_dtype=torch_dtype, device=device)


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
