"""The fused sampler's DDPM step equals diffusers' and its loop never waits for the device.

A GPU cannot be assumed here, so "no CPU<->GPU sync inside the loop" is checked on PyTorch's
``meta`` device: a sample on it has no values, so any read of one on the host raises, and a
dispatch mode sees every copy between the host and the device. The count of blocking copies
must not grow with the number of steps.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mitune.mi.estimators as mi_module
from mitune.mi.estimators import ddpm_step, sample_with_mi, step_noise
from mitune.models.builders import SD_DDPM_CONFIG

SHAPE = (3, 4, 8, 8)


class HostTransfers(TorchDispatchMode):
    """Records blocking copies between devices and host reads of device tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if name.startswith("_local_scalar_dense") and devices != {"cpu"}:
            self.events.append(f"host read {name}")
        if name.startswith("_to_copy") and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != args[0].device.type and not kwargs.get("non_blocking"):
                self.events.append(f"blocking copy {args[0].device.type} -> {kwargs['device']} {tuple(args[0].shape)}")
        if name.startswith("copy_") and args[0].device.type != args[1].device.type and not kwargs.get("non_blocking"):
            self.events.append(f"blocking copy_ {args[1].device.type} -> {args[0].device.type}")
        return func(*args, **kwargs)


def transfers(steps: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Blocking transfers of one fused sampling run on the meta device, with CPU generators."""
    monkeypatch.setattr(mi_module, "check_finite", lambda mi: mi)  # the one intended sync, after the loop
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    z_T = torch.empty(SHAPE, device="meta")
    emb, null = torch.ones(SHAPE[0], 1, 1, 1, device="meta"), torch.zeros(SHAPE[0], 1, 1, 1, device="meta")
    generators = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]

    def eps_fn(z_t: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return 0.1 * z_t + e + t.view(-1, 1, 1, 1) * 1e-3

    with HostTransfers() as mode:
        sample_with_mi(eps_fn, z_T, emb, null, scheduler, num_inference_steps=steps, guidance_scale=7.5,
                       generator=generators)
    return mode.events


def test_sampling_loop_has_no_blocking_transfer_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    few, many = transfers(3, monkeypatch), transfers(12, monkeypatch)
    assert len(few) == len(many), f"transfers grow with the steps: {few} vs {many}"
    assert len(few) <= 2, few  # timesteps and kappa weights, once each, before the loop


def test_diffusers_step_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: diffusers' own step copies its CPU-drawn noise at every step."""
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    scheduler.set_timesteps(5)
    z = torch.empty(SHAPE, device="meta")
    generators = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    with HostTransfers() as mode:
        for t in scheduler.timesteps[:3]:
            z = scheduler.step(z, t, z, generator=generators, return_dict=False)[0]
    assert sum("blocking copy" in e for e in mode.events) == 3


@pytest.mark.parametrize("overrides", [
    {"variance_type": "fixed_large"},
    {"variance_type": "fixed_small"},
    {"variance_type": "fixed_large", "clip_sample": True, "clip_sample_range": 0.5},
])
def test_ddpm_step_equals_diffusers_step(overrides: dict) -> None:
    """Bit-identical to ``DDPMScheduler.step`` given the same generators, at every step."""
    ours, theirs = (DDPMScheduler(**{**SD_DDPM_CONFIG, **overrides}) for _ in range(2))
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z_ours, z_theirs = z.clone(), z.clone()
    gens_ours = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    gens_theirs = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    for i, t in enumerate(ours.timesteps):
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        noise = step_noise(z.shape, gens_ours, z.device) if t > 0 else None
        z_ours = ddpm_step(ours, eps, t, z_ours, noise)
        z_theirs = theirs.step(eps, t, z_theirs, generator=gens_theirs, return_dict=False)[0]
        assert torch.equal(z_ours, z_theirs), f"step {i} (t={int(t)}) differs"


@pytest.mark.parametrize("overrides, message", [
    ({"prediction_type": "v_prediction"}, "epsilon-prediction"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"thresholding": True}, "thresholding"),
])
def test_unsupported_scheduler_settings_are_named(overrides: dict, message: str) -> None:
    scheduler = DDPMScheduler(**{**SD_DDPM_CONFIG, **overrides})
    z = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=message):
        sample_with_mi(lambda z_t, t, e: z_t, z, z, z, scheduler, num_inference_steps=2, guidance_scale=1.0)
