"""DoRA/LoRA adapters on the UNet (and optionally the text encoders), saved the way diffusers saves LoRAs.

An adapter dir holds ``pytorch_lora_weights.safetensors`` written by the pipeline class's own
``save_lora_weights``, so ``pipe.load_lora_weights(dir)`` in plain diffusers loads it, and
``mitune_adapter.json`` with the adapter config and a fingerprint of the base model, so that
loading an adapter into another base model fails loudly instead of silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from mitune.models.loading import load_pipeline
from mitune.runs.io import atomic_dir, write_json

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
META_NAME = "mitune_adapter.json"
ADAPTER_NAME = "default"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# peft matches a name when it equals an entry or ends with "." + entry. In diffusers'
# UNet2DConditionModel these suffixes occur only inside the transformer blocks (BasicTransformerBlock:
# attn1 = self-attention, attn2 = cross-attention, ff = GEGLU feed-forward), never in proj_in/proj_out,
# resnets or time embeddings. Checked on the tiny UNets and on UNets built from SD-2.1-base's and
# SDXL's configs, whose module names are the same: SD-2.1-base has 16 transformer blocks, so
# "attn_ff" adapts 160 linears and "attn" 128.
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
UNET_TARGETS: dict[str, list[str]] = {
    "attn_ff": ATTENTION_TARGETS + FEED_FORWARD_TARGETS,  # the paper (Table 8)
    "attn": ATTENTION_TARGETS,  # the authors' public SD2 script
}
# CLIP's self-attention and MLP linears, as diffusers' text-encoder LoRA loader expects them.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter hyper-parameters; the defaults are the paper's (Table 8: DoRA, rank 32, alpha 32, on
    attention projections and feed-forward linears), written only here: ``conf/adapter/dora.yaml``
    composes them (see ``mitune.config``).

    ``targets="attn"`` with ``use_dora=False`` is the authors' public SD2 script: plain LoRA on the
    attention projections only.
    """

    rank: int = 32
    alpha: int = 32
    use_dora: bool = True
    targets: str = "attn_ff"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"adapter alpha must be > 0, got {self.alpha}")
        if self.targets not in UNET_TARGETS:
            raise ValueError(f"adapter targets must be one of {sorted(UNET_TARGETS)}, got {self.targets!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")


def lora_config(config: AdapterConfig, targets: list[str]) -> LoraConfig:
    """peft's config; B starts at zero so the adapted model starts equal to the base."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        use_dora=config.use_dora,
        lora_dropout=config.dropout,
        init_lora_weights=True,
        target_modules=list(targets),
    )


# ----------------------------------------------------------------------------- adding


def _text_encoders(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's CLIP text encoders by component name (SDXL has two)."""
    return {name: getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}


def _pipeline_modules(pipe: DiffusionPipeline) -> list[torch.nn.Module]:
    return [pipe.unet, pipe.vae, *_text_encoders(pipe).values()]


def add_adapters(
    pipe: DiffusionPipeline, config: AdapterConfig, *, text_encoder: bool = False
) -> list[torch.nn.Parameter]:
    """Freeze the pipeline, add a fresh adapter to the UNet (and every text encoder), return what to train.

    ``text_encoder=True`` is the paper's optional joint UNet + text-encoder fine-tuning; on SDXL
    both text encoders are adapted, as diffusers' SDXL LoRA training does. The trainable weights
    are float32 whatever the base model's dtype (diffusers' ``cast_training_params``): AdamW updates
    of lr 1e-4 are below bf16's resolution for weights near 1 (DoRA's magnitudes) and round away.
    """
    for module in _pipeline_modules(pipe):
        module.requires_grad_(False)
    if text_encoder:  # first: transformers refuses adapters with a too-old peft, and the UNet stays clean
        for encoder in _text_encoders(pipe).values():
            encoder.add_adapter(lora_config(config, TEXT_ENCODER_TARGETS), adapter_name=ADAPTER_NAME)
    pipe.unet.add_adapter(lora_config(config, UNET_TARGETS[config.targets]), adapter_name=ADAPTER_NAME)
    modules = _pipeline_modules(pipe)
    cast_training_params(modules, dtype=torch.float32)
    return [param for module in modules for param in module.parameters() if param.requires_grad]


# ----------------------------------------------------------------------------- fingerprint


def _matches(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target_modules."""
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _target_shapes(module: torch.nn.Module, targets: list[str]) -> list[list[int]]:
    # A peft-wrapped layer keeps its name and exposes the base layer's weight, so the shapes are
    # the same before and after adding an adapter.
    return [list(m.weight.shape) for name, m in module.named_modules() if _matches(name, targets)]


def base_fingerprint(pipe: DiffusionPipeline) -> str:
    """Short hash of the shapes of every linear an adapter could touch, in module order.

    Shapes rather than config dicts or module names: they decide whether an adapter fits, and they
    do not change when a newer diffusers adds config keys or transformers renames CLIP's modules.
    """
    shapes = {"unet": _target_shapes(pipe.unet, UNET_TARGETS["attn_ff"])}
    for name, encoder in _text_encoders(pipe).items():
        shapes[name] = _target_shapes(encoder, TEXT_ENCODER_TARGETS)
    blob = json.dumps(shapes, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_meta(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's mitune metadata, after checking the dir is a complete adapter."""
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter dir {adapter_dir} does not exist")
    for name in (WEIGHTS_NAME, META_NAME):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"adapter dir {adapter_dir} has no {name}")
    return json.loads((adapter_dir / META_NAME).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- saving and loading


def _adapter_state(module: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """A module's adapter tensors with diffusers' key names, as the training scripts save them."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module, adapter_name=adapter_name))


def _adapted_components(pipe: DiffusionPipeline, adapter_name: str) -> dict[str, torch.nn.Module]:
    components = {"unet": pipe.unet, **_text_encoders(pipe)}
    return {name: m for name, m in components.items() if adapter_name in (getattr(m, "peft_config", None) or {})}


def save_adapters(
    pipe: DiffusionPipeline, out_dir: str | os.PathLike, *, base_model: str, config: AdapterConfig
) -> Path:
    """Write the adapter added by ``add_adapters`` in diffusers' LoRA format plus ``mitune_adapter.json``.

    The peft config goes into the safetensors metadata (diffusers' ``*_lora_adapter_metadata``) so
    that diffusers restores alpha and DoRA exactly instead of guessing them from tensor shapes.
    """
    adapted = _adapted_components(pipe, ADAPTER_NAME)
    if "unet" not in adapted:
        raise ValueError("the pipeline's UNet has no adapter; call add_adapters first")
    kwargs: dict[str, Any] = {}
    for name, module in adapted.items():
        kwargs[f"{name}_lora_layers"] = _adapter_state(module, ADAPTER_NAME)
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER_NAME].to_dict()
    meta = {
        "adapter": asdict(config),
        "base_model": str(base_model),
        "base_fingerprint": base_fingerprint(pipe),
        "components": sorted(adapted),
    }
    out = Path(out_dir).expanduser()
    with atomic_dir(out, META_NAME) as tmp:
        type(pipe).save_lora_weights(tmp, safe_serialization=True, **kwargs)
        write_json(tmp / META_NAME, meta)
    return out


def _check_base(pipe: DiffusionPipeline, adapter_dir: Path, meta: dict[str, Any]) -> None:
    fingerprint = base_fingerprint(pipe)
    if meta["base_fingerprint"] != fingerprint:
        name = getattr(pipe, "name_or_path", None)
        raise ValueError(
            f"adapter {adapter_dir} was trained on base model {meta['base_model']!r} (fingerprint "
            f"{meta['base_fingerprint']}); this pipeline is {name!r} (fingerprint {fingerprint})"
        )


def _read_weights(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors and the safetensors metadata (diffusers' peft configs)."""
    with safe_open(adapter_dir / WEIGHTS_NAME, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def _check_loaded(pipe: DiffusionPipeline, adapter_dir: Path, adapter_name: str) -> None:
    """Every saved tensor must have arrived: some library combinations drop tensors with only a warning.

    Known case: transformers' ``load_adapter`` with peft <= 0.21 misnames DoRA's
    ``lora_magnitude_vector`` for text encoders, leaving the base norms in place.
    """
    saved, _ = _read_weights(adapter_dir)
    loaded = {
        f"{name}.{key}": value
        for name, module in _adapted_components(pipe, adapter_name).items()
        for key, value in _adapter_state(module, adapter_name).items()
    }
    wrong = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k], v.to(loaded[k]))]
    if wrong:
        raise RuntimeError(
            f"diffusers did not load {len(wrong)} of {len(saved)} tensors of adapter {adapter_dir} "
            f"as saved (first: {wrong[0]}); check the diffusers/transformers/peft versions"
        )


def load_adapters(pipe: DiffusionPipeline, adapter_dir: str | os.PathLike, *, adapter_name: str = "default") -> None:
    """``pipe.load_lora_weights`` after checking the adapter was trained on this base model."""
    path = Path(adapter_dir).expanduser()
    _check_base(pipe, path, _read_meta(path))
    _load_checked(pipe, path, adapter_name)


def load_fused(pipe: DiffusionPipeline, adapter_dir: str | os.PathLike) -> None:
    """``load_adapters``, then merged into the weights: for inference only, where DoRA's per-call
    weight-norm and the extra LoRA matmuls would otherwise slow every UNet call."""
    load_adapters(pipe, adapter_dir, adapter_name=ADAPTER_NAME)
    pipe.fuse_lora()
    pipe.unload_lora_weights()


@contextmanager
def merged_adapters(pipe: DiffusionPipeline) -> Iterator[None]:
    """The pipeline's active adapters merged into the weights for a block of inference (a
    generation round between fine-tuning epochs), then the exact base weights back.

    Merged, a UNet call costs what the base model's does (DoRA otherwise rebuilds W + BA and its
    norm in every layer at every call). peft's unmerge alone is not exact in floating point, and
    training must resume from the very same base weights, so they are restored from a copy.
    """
    layers = [m for module in _pipeline_modules(pipe) for m in module.modules()
              if isinstance(m, BaseTunerLayer) and not m.merged]
    originals = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                if layer.merged:
                    layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)


class DoraNormCache:
    """DoRA's ``B @ A`` and weight norm ``||W + s BA||`` computed once per optimizer step, not once
    per micro-batch.

    peft rebuilds both in every training forward of every adapted layer, and caches them only in
    eval mode. DoRA treats the norm as a constant (detached, DoRA paper sec. 4.3), and between two
    optimizer steps the adapter does not change, so with gradient accumulation (the paper's batch
    400 is 25 micro-batches of 16) the cached values are exactly what peft would recompute.
    """

    METHODS = ("get_lora_weight", "get_weight_norm")

    def __init__(self, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.values: dict[tuple[int, str, str], torch.Tensor] = {}
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, DoraLinearLayer)]
        for layer in self.layers:
            for name in self.METHODS:
                setattr(layer, name, self._cached(layer, name, getattr(layer, name)))
        optimizer.register_step_post_hook(lambda *args: self.values.clear())

    def _cached(self, layer: DoraLinearLayer, name: str, compute):
        def cached(*args, **kwargs) -> torch.Tensor:
            if kwargs.get("adapter_name") is None:  # init and merge, as in peft's own cache
                return compute(*args, **kwargs)
            key = (id(layer), name, kwargs["adapter_name"])
            if key not in self.values:
                self.values[key] = compute(*args, **kwargs).detach()
            return self.values[key]

        return cached


def _load_checked(pipe: DiffusionPipeline, adapter_dir: Path, adapter_name: str) -> None:
    pipe.load_lora_weights(str(adapter_dir), adapter_name=adapter_name)
    _check_loaded(pipe, adapter_dir, adapter_name)


# ----------------------------------------------------------------------------- export and merge


def export_pipeline(
    base: str | None, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fuse: bool = True,
    scale: float = 1.0,
) -> Path:
    """A plain diffusers pipeline dir of base + adapter, for tools that know nothing of LoRA or peft.

    ``base`` None: the base model the adapter records (``mitune_adapter.json``); its fingerprint is checked
    either way.

    With ``fuse`` the adapter is merged into the weights (times ``scale``). Without, the base is
    saved unchanged with the adapter file beside ``model_index.json``, so that
    ``DiffusionPipeline.from_pretrained(out).load_lora_weights(out)`` rebuilds it.
    """
    if not fuse and scale != 1.0:
        raise ValueError(f"scale applies only when fusing; got scale={scale} with fuse=False")
    adapter = Path(adapter_dir).expanduser()
    meta = _read_meta(adapter)  # a bad adapter dir fails before a large base model is loaded
    pipe = load_pipeline(meta["base_model"] if base is None else base)
    _check_base(pipe, adapter, meta)
    if fuse:
        _load_checked(pipe, adapter, ADAPTER_NAME)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    out = Path(out_dir).expanduser()
    with atomic_dir(out, "model_index.json") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if not fuse:
            shutil.copy2(adapter / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
            shutil.copy2(adapter / META_NAME, tmp / META_NAME)
    return out


def _normalised(weights: list[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} adapters")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"merge weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total == 0:
        raise ValueError("merge weights are all zero")
    return [w / total for w in weights]


@dataclass(frozen=True)
class _Saved:
    """An adapter dir as read for merging."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    file_metadata: dict[str, str]


def _read_saved(adapter_dir: str | os.PathLike) -> _Saved:
    path = Path(adapter_dir).expanduser()
    meta = _read_meta(path)
    return _Saved(path, meta, *_read_weights(path))


def _check_compatible(first: _Saved, other: _Saved) -> None:
    for field in ("base_fingerprint", "adapter", "components"):
        if first.meta[field] != other.meta[field]:
            raise ValueError(
                f"cannot merge {other.path} into {first.path}: {field} differs "
                f"({other.meta[field]} vs {first.meta[field]})"
            )
    if first.tensors.keys() != other.tensors.keys():
        raise ValueError(f"cannot merge {other.path} into {first.path}: the adapters hold different tensors")
    for key, value in first.tensors.items():
        if other.tensors[key].shape != value.shape:
            shape = tuple(other.tensors[key].shape)
            raise ValueError(f"cannot merge {other.path} into {first.path}: {key} has shape {shape}")


def merge_adapters(adapter_dirs: list[str | os.PathLike], weights: list[float], out_dir: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """One adapter from several per-category ones by weighted mean of each saved tensor (paper, App. E.3).

    Each saved tensor (A, B and DoRA's magnitude) is averaged on its own, so the merged update is
    not the mean of the adapters' B @ A. Weights are normalised to sum to 1, so (1, 0) returns the
    first adapter unchanged.
    """
    if not adapter_dirs:
        raise ValueError("no adapters to merge")
    out = Path(out_dir).expanduser()
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "an adapter" if (out / META_NAME).is_file() or (out / WEIGHTS_NAME).is_file() else "files"
        raise FileExistsError(f"--out {out} already holds {what} (a run's adapter/ is its result); choose a new "
                              "folder, or pass --overwrite (overwrite=True) to replace it")
    shares = _normalised([float(w) for w in weights], len(adapter_dirs))
    saved = [_read_saved(d) for d in adapter_dirs]
    for other in saved[1:]:
        _check_compatible(saved[0], other)
    merged = {
        key: sum(share * adapter.tensors[key].float() for share, adapter in zip(shares, saved)).to(value.dtype)
        for key, value in saved[0].tensors.items()
    }
    meta = {**saved[0].meta, "merged_from": [{"adapter": str(a.path), "weight": w} for a, w in zip(saved, shares)]}
    with atomic_dir(out, META_NAME) as tmp:
        save_file(merged, str(tmp / WEIGHTS_NAME), metadata=saved[0].file_metadata)
        write_json(tmp / META_NAME, meta)
    return out
