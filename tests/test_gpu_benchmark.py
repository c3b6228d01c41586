"""The GPU benchmark script runs end to end on CPU at tiny sizes, so the GPU session finds working code."""

import pytest
import torch
from diffusers import UNet2DConditionModel


@pytest.fixture(scope="module")
def gpu(load_benchmark):
    return load_benchmark("gpu")


@pytest.mark.slow
def test_main_writes_report_on_cpu(gpu, tmp_path):
    out = tmp_path / "gpu_cpu.md"
    argv = ["--device", "cpu", "--latent", "8", "--gen-batches", "1", "--steps", "2", "--train-batch", "1",
            "--accumulation", "2", "--repeats", "1", "--channels-last", "--out", str(out)]
    assert gpu.main(argv) == out
    text = out.read_text()
    assert "Command: `python benchmarks/gpu.py --device cpu --latent 8" in text
    assert "| 1 | " in text  # the generation row of micro-batch 1
    assert "**MI overhead ratio**" in text
    assert "| DoRA | " in text and "| DoRA + norm cache | " in text and "| LoRA | " in text
    assert "2 micro-batches of 1 per optimizer step = 2 samples" in text
    assert "MFU" in text and "n/a" in text  # no --peak-tflops on CPU
    assert "process peak RSS" in text
    assert "channels-last: yes" in text
    assert "attention: AttnProcessor2_0" in text  # diffusers' PyTorch-SDPA processor, nothing slower


@pytest.mark.parametrize("model, latent", [("sd21", 8), ("sdxl", 16)])
def test_forward_flops_scale_linearly_with_batch(gpu, model, latent):
    with torch.device("meta"):  # the full configs, without allocating their weights
        unet = UNet2DConditionModel(**gpu.MODELS[model])
    meta = torch.device("meta")
    one, two = (gpu.forward_flops(unet, b, latent, meta) for b in (1, 2))
    assert one > 0
    assert two / one == pytest.approx(2.0, rel=0.01)


@pytest.mark.slow
def test_generation_only_run_has_no_training_section(gpu, tmp_path):
    """`--adapters` with no names: the compile / channels-last runs of benchmarks/device.py."""
    out = tmp_path / "gen.md"
    gpu.main(["--device", "cpu", "--latent", "8", "--gen-batches", "1", "--steps", "2", "--repeats", "1",
              "--adapters", "--out", str(out)])
    text = out.read_text()
    assert "| 1 | " in text and "**MI overhead ratio**" in text
    assert "## Training step" not in text and "train " not in text
