"""Adapters: training setup, diffusers-format save/load, export, merge and the CLI, on the tiny pipelines."""

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from packaging.version import Version
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from mitune.cli import main as cli_main
from mitune.mi.pipeline import encode_prompts, latent_shape, unet_eps_fn
from mitune.models import adapters
from mitune.models.adapters import (
    META_NAME,
    TEXT_ENCODERS,
    UNET_TARGETS,
    WEIGHTS_NAME,
    AdapterConfig,
    add_adapters,
    export_pipeline,
    load_adapters,
    lora_config,
    merge_adapters,
    save_adapters,
)
from mitune.models.builders import SD21_BASE_UNET
from mitune.models.loading import load_pipeline

SMALL_LORA = AdapterConfig(rank=4, alpha=8, use_dora=False)  # alpha != rank: the saved config must carry it
SMALL_DORA = AdapterConfig(rank=4, alpha=8, use_dora=True)
PROMPTS = ["a red cube", "a blue ball"]


def _transformers_takes_adapters() -> bool:
    """transformers refuses add_adapter/load_adapter with a peft older than its MIN_PEFT_VERSION."""
    from transformers.integrations import peft as integration

    return Version(peft.__version__) >= Version(getattr(integration, "MIN_PEFT_VERSION", "0"))


needs_text_encoder_adapters = pytest.mark.skipif(
    not _transformers_takes_adapters(),
    reason="this transformers needs a newer peft for text-encoder adapters (transformers 5.24 wants peft >= 0.22)",
)


@torch.no_grad()
def _eps(pipe) -> torch.Tensor:
    """The UNet's output on fixed noise, timesteps and prompts (through the text encoder too)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(latent_shape(pipe, len(PROMPTS)), generator=generator)
    return unet_eps_fn(pipe)(z, torch.tensor([10, 500]), encode_prompts(pipe, PROMPTS))


@torch.no_grad()
def _randomise(params: list[torch.nn.Parameter], seed: int) -> None:
    """Move the adapter away from its identity init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _adapted(path: Path, config: AdapterConfig, *, seed: int = 0, text_encoder: bool = False):
    pipe = load_pipeline(str(path))
    _randomise(add_adapters(pipe, config, text_encoder=text_encoder), seed)
    return pipe


def _save_adapted(path: Path, out: Path, config: AdapterConfig, *, seed: int = 0, text_encoder: bool = False):
    """An adapted pipeline, its UNet output and the adapter dir it was saved to."""
    pipe = _adapted(path, config, seed=seed, text_encoder=text_encoder)
    save_adapters(pipe, out, base_model=str(path), config=config)
    return pipe, _eps(pipe), out


def _adapted_modules(unet: torch.nn.Module) -> list[str]:
    return [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def _matching_linears(unet: torch.nn.Module, targets: list[str]) -> list[str]:
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sd_lora(tiny_sd_path, tmp_path_factory):
    return _save_adapted(tiny_sd_path, tmp_path_factory.mktemp("a") / "lora", SMALL_LORA, seed=1)


@pytest.fixture(scope="module")
def sd_lora_2(tiny_sd_path, tmp_path_factory):
    return _save_adapted(tiny_sd_path, tmp_path_factory.mktemp("a") / "lora2", SMALL_LORA, seed=2)


@pytest.fixture(scope="module")
def sd_dora(tiny_sd_path, tmp_path_factory):
    return _save_adapted(tiny_sd_path, tmp_path_factory.mktemp("a") / "dora", SMALL_DORA, seed=3)


@pytest.fixture(scope="module")
def sdxl_dora(tiny_sdxl_path, tmp_path_factory):
    return _save_adapted(tiny_sdxl_path, tmp_path_factory.mktemp("a") / "sdxl", SMALL_DORA, seed=4)


# ----------------------------------------------------------------------------- config and targets


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(rank=0), "0"),
        (dict(alpha=0), "0"),
        (dict(targets="all"), "'all'"),
        (dict(dropout=1.0), "1.0"),
        (dict(dropout=-0.1), "-0.1"),
    ],
)
def test_config_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        AdapterConfig(**kwargs)


def test_defaults_are_the_papers_dora():
    config = lora_config(AdapterConfig(), UNET_TARGETS["attn_ff"])
    assert (config.r, config.lora_alpha, config.use_dora, config.lora_dropout) == (32, 32, True, 0.0)
    assert config.init_lora_weights is True
    assert set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"}


def test_targets_match_only_transformer_blocks_of_sd21_base():
    """SD-2.1-base's real UNet config: 16 transformer blocks of 10 (attn_ff) or 8 (attn) linears."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
    attn_ff = _matching_linears(unet, UNET_TARGETS["attn_ff"])
    assert len(attn_ff) == 160
    assert len(_matching_linears(unet, UNET_TARGETS["attn"])) == 128
    assert all(".transformer_blocks." in name for name in attn_ff)


@pytest.mark.parametrize("targets", ["attn_ff", "attn"])
def test_only_adapter_weights_train(tiny_sd_path, targets):
    pipe = load_pipeline(str(tiny_sd_path))
    expected = _matching_linears(pipe.unet, UNET_TARGETS[targets])
    params = add_adapters(pipe, AdapterConfig(rank=4, targets=targets))
    trainable = {id(p) for p in params}
    named = [(n, p) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for n, p in m.named_parameters()]
    assert {id(p) for n, p in named if "lora_" in n} == trainable
    assert all(not p.requires_grad for n, p in named if "lora_" not in n)
    assert _adapted_modules(pipe.unet) == expected
    assert len(expected) == {"attn_ff": 40, "attn": 32}[targets]  # 4 transformer blocks in the tiny UNet


@pytest.mark.parametrize("config", [SMALL_LORA, SMALL_DORA], ids=["lora", "dora"])
def test_fresh_adapter_leaves_the_unet_unchanged(tiny_sd_path, config):
    pipe = load_pipeline(str(tiny_sd_path))
    before = _eps(pipe)
    add_adapters(pipe, config)
    torch.testing.assert_close(_eps(pipe), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("text_encoder", [False, pytest.param(True, marks=needs_text_encoder_adapters)],
                         ids=["unet", "unet+text-encoder"])
def test_adapters_on_a_bf16_base_train_in_fp32(tiny_sd_path, text_encoder):
    """bf16 AdamW updates round away (see test_training's bf16 step), so trainable weights are fp32."""
    pipe = load_pipeline(str(tiny_sd_path), torch_dtype="bfloat16")
    params = add_adapters(pipe, SMALL_DORA, text_encoder=text_encoder)
    assert params and {p.dtype for p in params} == {torch.float32}
    frozen = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}


# ----------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("adapter", ["sd_lora", "sd_dora"])
def test_plain_diffusers_loads_the_saved_adapter(tiny_sd_path, adapter, request):
    _, adapted_eps, folder = request.getfixturevalue(adapter)
    fresh = load_pipeline(str(tiny_sd_path))
    assert not torch.allclose(_eps(fresh), adapted_eps, atol=1e-3)
    fresh.load_lora_weights(str(folder))
    torch.testing.assert_close(_eps(fresh), adapted_eps, atol=1e-6, rtol=0)
    assert _files(folder) == {WEIGHTS_NAME, META_NAME}


@pytest.mark.parametrize("config", [SMALL_LORA, SMALL_DORA], ids=["lora", "dora"])
def test_plain_diffusers_loads_an_adapter_trained_on_a_bf16_base(tiny_sd_path, tmp_path, config):
    """Saved in fp32 (as diffusers' training scripts save them); a bf16 pipeline loads them as usual.

    diffusers casts loaded adapter weights to the pipeline's dtype, so the loaded model matches the
    trained one up to bf16 rounding: measured mean |diff| 0.0025 against 0.026 from the base model.
    """
    pipe = load_pipeline(str(tiny_sd_path), torch_dtype="bfloat16")
    _randomise(add_adapters(pipe, config), seed=5)
    save_adapters(pipe, tmp_path / "adapter", base_model=str(tiny_sd_path), config=config)
    assert {v.dtype for v in load_file(tmp_path / "adapter" / WEIGHTS_NAME).values()} == {torch.float32}

    fresh = load_pipeline(str(tiny_sd_path), torch_dtype="bfloat16")
    trained, base = _eps(pipe).float(), _eps(fresh).float()
    fresh.load_lora_weights(str(tmp_path / "adapter"))
    loaded = _eps(fresh).float()
    assert (loaded - trained).abs().mean() < 0.2 * (base - trained).abs().mean()


def test_dora_magnitudes_are_saved(sd_dora):
    tensors = load_file(sd_dora[2] / WEIGHTS_NAME)
    assert sum("lora_magnitude_vector" in key for key in tensors) == 40


def test_load_adapters_roundtrips(tiny_sd_path, sd_dora):
    pipe = load_pipeline(str(tiny_sd_path))
    load_adapters(pipe, sd_dora[2])
    torch.testing.assert_close(_eps(pipe), sd_dora[1], atol=1e-6, rtol=0)


def test_fused_adapters_give_the_adapted_output_without_adapter_layers(tiny_sd_path, sd_dora):
    pipe = load_pipeline(str(tiny_sd_path))
    adapters.load_fused(pipe, sd_dora[2])
    assert not _adapted_modules(pipe.unet)  # plain Linear layers: no per-call DoRA norm or LoRA matmuls
    torch.testing.assert_close(_eps(pipe), sd_dora[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SMALL_DORA, SMALL_LORA], ids=["dora", "lora"])
@pytest.mark.parametrize("text_encoder", [False, pytest.param(True, marks=needs_text_encoder_adapters)],
                         ids=["unet", "unet+text"])
def test_merged_adapters_compute_the_adapted_model_and_restore_it_exactly(tiny_sd_path, config, text_encoder):
    pipe = _adapted(tiny_sd_path, config, seed=5, text_encoder=text_encoder)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    adapted = _eps(pipe)
    with adapters.merged_adapters(pipe):
        merged_layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
        assert merged_layers and all(m.merged for m in merged_layers)
        torch.testing.assert_close(_eps(pipe), adapted, atol=1e-5, rtol=1e-5)
    assert not any(m.merged for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer))
    for name, value in pipe.unet.state_dict().items():  # bit-identical: training resumes from these
        assert torch.equal(value, weights[name]), name
    for name, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(value, text_weights[name]), name
    assert torch.equal(_eps(pipe), adapted)


def test_merged_adapters_restore_the_weights_after_an_error(tiny_sd_path):
    pipe = _adapted(tiny_sd_path, SMALL_DORA, seed=6)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(RuntimeError, match="killed mid-round"):
        with adapters.merged_adapters(pipe):
            raise RuntimeError("killed mid-round")
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())


def test_load_adapters_refuses_another_base_model(tiny_sd_path, sdxl_dora):
    pipe = load_pipeline(str(tiny_sd_path))
    with pytest.raises(ValueError, match="was trained on base model") as err:
        load_adapters(pipe, sdxl_dora[2])
    assert str(sdxl_dora[2]) in str(err.value)
    assert not _adapted_modules(pipe.unet)  # refused before loading anything


def test_load_adapters_names_missing_files(tiny_sd_path, sd_lora, tmp_path):
    pipe = load_pipeline(str(tiny_sd_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_adapters(pipe, tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / META_NAME).write_bytes((sd_lora[2] / META_NAME).read_bytes())
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapters(pipe, tmp_path / "half")


def test_save_replaces_atomically(tiny_sd_path, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    first = _save_adapted(tiny_sd_path, out, SMALL_LORA, seed=5)[2]
    old = load_file(first / WEIGHTS_NAME)
    pipe = _adapted(tiny_sd_path, SMALL_LORA, seed=6)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(pipe, out, base_model="tiny", config=SMALL_LORA)
    monkeypatch.undo()
    assert all(torch.equal(v, load_file(out / WEIGHTS_NAME)[k]) for k, v in old.items())
    save_adapters(pipe, out, base_model="tiny", config=SMALL_LORA)
    assert not all(torch.equal(v, load_file(out / WEIGHTS_NAME)[k]) for k, v in old.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary siblings left


def test_save_refuses_to_replace_an_unrelated_dir(tiny_sd_path, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    pipe = _adapted(tiny_sd_path, SMALL_LORA)
    with pytest.raises(FileExistsError, match="refusing"):
        save_adapters(pipe, tmp_path, base_model="tiny", config=SMALL_LORA)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("adapter", ["sd_lora", "sd_dora"])
def test_fused_export_is_a_plain_pipeline(tiny_sd_path, adapter, request, tmp_path):
    _, adapted_eps, folder = request.getfixturevalue(adapter)
    out = export_pipeline(str(tiny_sd_path), folder, tmp_path / "export")
    exported = DiffusionPipeline.from_pretrained(out)
    assert not _adapted_modules(exported.unet)
    assert not any("lora" in name for name in exported.unet.state_dict())
    torch.testing.assert_close(_eps(exported), adapted_eps, atol=1e-5, rtol=0)
    assert not [f for f in _files(out) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]


def test_fused_export_scales_the_adapter(tiny_sd_path, sd_lora, tmp_path):
    base_eps = _eps(load_pipeline(str(tiny_sd_path)))
    out = export_pipeline(str(tiny_sd_path), sd_lora[2], tmp_path / "export", scale=0.0)
    torch.testing.assert_close(_eps(DiffusionPipeline.from_pretrained(out)), base_eps, atol=1e-6, rtol=0)


def test_unfused_export_keeps_the_adapter_beside_the_base(tiny_sd_path, sd_dora, tmp_path):
    out = export_pipeline(str(tiny_sd_path), sd_dora[2], tmp_path / "export", fuse=False)
    exported = DiffusionPipeline.from_pretrained(out)
    exported.load_lora_weights(str(out))
    torch.testing.assert_close(_eps(exported), sd_dora[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="only when fusing"):
        export_pipeline(str(tiny_sd_path), sd_dora[2], tmp_path / "x", fuse=False, scale=0.5)


@needs_text_encoder_adapters
@pytest.mark.parametrize("base, encoders", [("tiny_sd_path", 1), ("tiny_sdxl_path", 2)])
def test_text_encoder_lora_exports(base, encoders, request, tmp_path):
    path = request.getfixturevalue(base)
    _, adapted_eps, folder = _save_adapted(path, tmp_path / "te", SMALL_LORA, text_encoder=True)
    components = {key.split(".")[0] for key in load_file(folder / WEIGHTS_NAME)}
    assert components == {"unet", *TEXT_ENCODERS[:encoders]}
    out = export_pipeline(str(path), folder, tmp_path / "export")
    torch.testing.assert_close(_eps(DiffusionPipeline.from_pretrained(out)), adapted_eps, atol=1e-5, rtol=0)


@needs_text_encoder_adapters
def test_text_encoder_dora_loads_exactly_or_fails_loudly(tiny_sd_path, tmp_path):
    """peft <= 0.21 drops text-encoder DoRA magnitudes when transformers loads them; never silently."""
    _, adapted_eps, folder = _save_adapted(tiny_sd_path, tmp_path / "te", SMALL_DORA, text_encoder=True)
    pipe = load_pipeline(str(tiny_sd_path))
    try:
        load_adapters(pipe, folder)
    except RuntimeError as err:
        assert "text_encoder." in str(err)
    else:
        torch.testing.assert_close(_eps(pipe), adapted_eps, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- merge


def test_merge_with_one_weight_reproduces_that_adapter(sd_lora, sd_lora_2, tmp_path):
    out = merge_adapters([sd_lora[2], sd_lora_2[2]], [1.0, 0.0], tmp_path / "merged")
    merged, original = load_file(out / WEIGHTS_NAME), load_file(sd_lora[2] / WEIGHTS_NAME)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)


def test_merge_is_the_weighted_mean_and_loads(tiny_sd_path, sd_lora, sd_lora_2, tmp_path):
    out = merge_adapters([sd_lora[2], sd_lora_2[2]], [2.0, 2.0], tmp_path / "merged")
    merged, a, b = (load_file(d / WEIGHTS_NAME) for d in (out, sd_lora[2], sd_lora_2[2]))
    for key in a:
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
    meta = json.loads((out / META_NAME).read_text())
    assert [m["weight"] for m in meta["merged_from"]] == [0.5, 0.5]
    pipe = load_pipeline(str(tiny_sd_path))
    load_adapters(pipe, out)
    assert pipe.unet.peft_config["default"].lora_alpha == SMALL_LORA.alpha


def test_merge_refuses_incompatible_adapters(sd_lora, sd_dora, sdxl_dora, tmp_path):
    with pytest.raises(ValueError, match="adapter differs"):
        merge_adapters([sd_lora[2], sd_dora[2]], [1, 1], tmp_path / "m")
    with pytest.raises(ValueError, match="base_fingerprint differs"):
        merge_adapters([sd_dora[2], sdxl_dora[2]], [1, 1], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "weights, message",
    [([1.0], "1 weights for 2 adapters"), ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "all zero"), ([math.nan, 1], "finite")],
)
def test_merge_refuses_bad_weights(sd_lora, sd_lora_2, tmp_path, weights, message):
    with pytest.raises(ValueError, match=message):
        merge_adapters([sd_lora[2], sd_lora_2[2]], weights, tmp_path / "m")


# ----------------------------------------------------------------------------- CLI


def test_cli_export_and_merge(tiny_sd_path, sd_lora, sd_lora_2, tmp_path, capsys):
    assert cli_main(["export", "--base", str(tiny_sd_path), "--adapter", str(sd_lora[2]),
                     "--out", str(tmp_path / "export")]) == 0, capsys.readouterr().err
    assert (tmp_path / "export" / "model_index.json").is_file()
    capsys.readouterr()
    assert cli_main(["merge", "--adapters", str(sd_lora[2]), str(sd_lora_2[2]), "--weights", "1", "0",
                     "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")


def test_cli_bad_input_is_one_line(sd_lora, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        cli_main(["merge", "--adapters", str(sd_lora[2]), "--weights", "x", "--out", str(tmp_path / "m")])
    assert usage.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "invalid float value: 'x'" in stderr
    assert cli_main(["export", "--base", str(tmp_path), "--adapter", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "e")]) == 1
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1] == f"mitune export: error: adapter dir {tmp_path / 'nope'} does not exist"
    assert "Traceback" not in stderr
    assert cli_main(["merge", "--adapters", str(sd_lora[2]), "--weights", "1", "2", "--out", str(tmp_path / "m")]) == 1
    assert "2 weights for 1 adapters" in capsys.readouterr().err


def test_the_shipped_toy_model_by_name_and_export_without_base(tmp_path, capsys):
    """``load_pipeline("toy")`` and ``mitune export --base toy`` work as ``rerank --model toy`` does; without
    ``--base`` export uses the base model the adapter records."""
    from mitune import ASSETS

    pipe = load_pipeline("toy")
    assert Path(pipe.unet.config._name_or_path).resolve() == (ASSETS / "toy-model" / "unet").resolve()
    _, adapted_eps, folder = _save_adapted("toy", tmp_path / "adapter", SMALL_LORA)
    assert json.loads((folder / META_NAME).read_text())["base_model"] == "toy"
    for base in (["--base", "toy"], []):
        out = tmp_path / f"export{len(base)}"
        assert cli_main(["export", *base, "--adapter", str(folder), "--out", str(out)]) == 0, capsys.readouterr().err
        torch.testing.assert_close(_eps(DiffusionPipeline.from_pretrained(out)), adapted_eps, atol=1e-5, rtol=0)
