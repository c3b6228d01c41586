"""Generation throughput: mitune with MI vs diffusers' StableDiffusionPipeline, side by side.

Same UNet, scheduler (DDPM, sigma_t^2 = beta_t), batch, steps, guidance and initial
latents; both include text encoding, sampling and VAE decoding. Runs are interleaved and
the median is reported, so drift of the machine hits both alike. Writes a Markdown file
under docs/benchmarks/.

    python benchmarks/generation.py [--batch 16] [--steps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from mitune.generation import GenerationConfig, Job, generate_batch
from mitune.models import build_tiny_pipeline, ddpm_scheduler, decode_latents, latent_shape, load_pipeline

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "generation_cpu.md"


class CallCounter:
    """Counts UNet forward calls and the samples they carried."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = 0
        self.samples = 0
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        self.calls += 1
        self.samples += (args[0] if args else kwargs["sample"]).shape[0]

    def reset(self) -> None:
        self.calls = self.samples = 0


def seeds(batch: int) -> list[int]:
    return list(range(batch))


def run_mitune(pipe, prompts: list[str], config: GenerationConfig) -> None:
    jobs = [Job(i, 0, s) for i, s in enumerate(seeds(len(prompts)))]
    latents, _ = generate_batch(pipe, prompts, jobs, config)
    decode_latents(pipe, latents)


def run_diffusers(pipe, prompts: list[str], config: GenerationConfig) -> None:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds(len(prompts))]
    pipe(prompts, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
         generator=generators, output_type="pil")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(str(build_tiny_pipeline(Path(tmp) / "tiny-sd")))
    pipe.scheduler = ddpm_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(pipe.unet)
    prompts = [f"a red cube and a blue ball number {i}" for i in range(args.batch)]
    config = GenerationConfig(num_candidates=1, num_inference_steps=args.steps, guidance_scale=7.5,
                              micro_batch=args.batch)

    calls = {}
    for name, fn in [("mitune", run_mitune), ("diffusers", run_diffusers)]:
        counter.reset()
        fn(pipe, prompts, config)  # warm-up, and count calls
        calls[name] = (counter.calls, counter.samples)
    times: dict[str, list[float]] = {"mitune": [], "diffusers": []}
    for _ in range(args.repeats):
        times["mitune"].append(timed(run_mitune, pipe, prompts, config))
        times["diffusers"].append(timed(run_diffusers, pipe, prompts, config))

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["mitune"] / med["diffusers"]
    lines = [
        "# Generation throughput on CPU: mitune (with MI) vs diffusers",
        "",
        f"Command: `python benchmarks/generation.py --batch {args.batch} --steps {args.steps} --repeats {args.repeats}`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- model: tiny random-init SD pipeline (`mitune.models.build_tiny_pipeline`), "
        f"latents {tuple(latent_shape(pipe, 1)[1:])}, UNet {sum(p.numel() for p in pipe.unet.parameters()):,} parameters",
        f"- work: batch {args.batch}, {args.steps} DDPM steps, CFG 7.5, text encoding + sampling + VAE decode",
        "",
        "| | median s / batch | images/s | UNet calls / batch | samples / UNet call |",
        "|---|---|---|---|---|",
    ]
    for name in ("mitune", "diffusers"):
        n_calls, n_samples = calls[name]
        lines.append(f"| {name} | {med[name]:.3f} | {args.batch / med[name]:.1f} | {n_calls} | {n_samples / n_calls:.0f} |")
    lines += [
        "",
        f"**Ratio mitune / diffusers: {ratio:.3f}** (target <= 1.03). "
        f"All runs (s): mitune {[round(t, 3) for t in times['mitune']]}, "
        f"diffusers {[round(t, 3) for t in times['diffusers']]}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    if calls["mitune"] != calls["diffusers"]:
        raise SystemExit(f"UNet calls differ: {calls}")


if __name__ == "__main__":
    main()
