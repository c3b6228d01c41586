"""Ablation options of the training step: joint text-encoder training and plain LoRA."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.dora import DoraLinearLayer

from mitune.models.adapters import AdapterConfig
from mitune.models.loading import load_pipeline
from mitune.rounds.module import MITuneModule, TrainConfig

PROMPTS = ["a red cat", "a blue dog"]


def one_step(module: MITuneModule) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (2, module.unet.config.in_channels, module.unet.config.sample_size, module.unet.config.sample_size)
    batch = {"latents": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
             "prompt": torch.tensor([0, 1]), "t": torch.tensor([600, 900])}
    optimizer = module.configure_optimizers()
    module.training_step(batch, 0).backward()
    optimizer.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_joint_text_encoder_training_moves_only_both_adapters(tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    module = MITuneModule(pipe, AdapterConfig(rank=4, alpha=4), TrainConfig(train_text_encoder=True))
    module.set_prompts(PROMPTS)
    assert module.embeddings is None  # embeddings are computed in the step, with gradients
    before_te, before_unet = snapshot(pipe.text_encoder), snapshot(pipe.unet)
    one_step(module)
    for before, component in ((before_te, pipe.text_encoder), (before_unet, pipe.unet)):
        moved = {n for n, p in component.named_parameters() if not torch.equal(p, before[n])}
        assert moved, "no adapter weight moved"
        assert all("lora_" in n for n in moved), sorted(n for n in moved if "lora_" not in n)


def test_lora_option_has_no_magnitude_vectors(tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    dora = {n for n, _ in MITuneModule(load_pipeline(str(tiny_sd_path)), AdapterConfig(rank=4, alpha=4), TrainConfig()).named_parameters()
            if "lora_" in n}
    lora_module = MITuneModule(pipe, AdapterConfig(rank=4, alpha=4, use_dora=False), TrainConfig())
    lora = {n for n, p in lora_module.named_parameters() if p.requires_grad}
    assert any("magnitude" in n for n in dora)
    assert lora and not any("magnitude" in n for n in lora)
    assert lora == {n for n in dora if "magnitude" not in n}


def test_text_encoder_training_on_sdxl_is_refused(tiny_sdxl_path):
    with pytest.raises(ValueError, match="train_text_encoder is supported for SD 1.x/2.x"):
        MITuneModule(load_pipeline(str(tiny_sdxl_path)), AdapterConfig(rank=4, alpha=4), TrainConfig(train_text_encoder=True))


def test_t_max_beyond_the_schedule_is_refused(tiny_sd_path):
    with pytest.raises(ValueError, match="t_max=1001 exceeds the model's 1000 timesteps"):
        MITuneModule(load_pipeline(str(tiny_sd_path)), AdapterConfig(rank=4, alpha=4), TrainConfig(t_max=1001))


def accumulated_training(path, cache: bool) -> dict[str, torch.Tensor]:
    """3 optimizer steps of 4 accumulated micro-batches each, UNet and text encoder with DoRA."""
    pipe = load_pipeline(str(path))
    module = MITuneModule(pipe, AdapterConfig(rank=4, alpha=4), TrainConfig(train_text_encoder=True, cache_dora_norm=cache))
    module.set_prompts(PROMPTS)
    optimizer = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    shape = (2, module.unet.config.in_channels, module.unet.config.sample_size, module.unet.config.sample_size)
    for _ in range(3):
        for _ in range(4):
            batch = {"latents": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
                     "prompt": torch.tensor([0, 1]), "t": torch.randint(500, 1000, (2,), generator=g)}
            module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {**snapshot(pipe.unet), **{f"te.{k}": v for k, v in snapshot(pipe.text_encoder).items()}}


def test_dora_norm_cache_is_exact_and_computes_once_per_optimizer_step(tiny_sd_path, monkeypatch):
    calls = []
    original = DoraLinearLayer.get_weight_norm

    def counted(self, *args, **kwargs):
        if kwargs.get("adapter_name") is not None:  # the training forwards (init and merge pass none)
            calls.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DoraLinearLayer, "get_weight_norm", counted)
    cached = accumulated_training(tiny_sd_path, cache=True)
    layers, cached_calls = len(set(calls)), len(calls)
    calls.clear()
    plain = accumulated_training(tiny_sd_path, cache=False)
    assert layers > 0 and cached_calls == 3 * layers  # once per layer per optimizer step
    assert len(calls) == 12 * layers  # peft alone: once per layer per micro-batch
    moved = [name for name in plain if "lora_" in name]
    assert moved and all(torch.equal(cached[name], plain[name]) for name in plain)  # bit-identical training


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sdxl_path):
    """train.gradient_checkpointing (SDXL at full size on little memory) only trades compute for memory."""
    grads = []
    for checkpointing in (False, True):
        module = MITuneModule(load_pipeline(str(tiny_sdxl_path)), AdapterConfig(rank=4, alpha=4),
                              TrainConfig(gradient_checkpointing=checkpointing, cache_dora_norm=False))
        assert module.unet.is_gradient_checkpointing == checkpointing
        module.set_prompts(PROMPTS)
        g = torch.Generator().manual_seed(0)
        shape = (2, 4, module.unet.config.sample_size, module.unet.config.sample_size)
        batch = {"latents": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
                 "prompt": torch.tensor([0, 1]), "t": torch.tensor([600, 900])}
        module.training_step(batch, 0).backward()
        grads.append({n: p.grad.clone() for n, p in module.unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_refuses_the_dora_norm_cache():
    """The full-size SDXL smoke run met it: the recomputed forward took the cached norm and saved fewer tensors."""
    with pytest.raises(ValueError, match="train.gradient_checkpointing=true needs train.cache_dora_norm=false"):
        TrainConfig(gradient_checkpointing=True)
