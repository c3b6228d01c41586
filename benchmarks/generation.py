"""Generation throughput: mitune with MI vs diffusers' StableDiffusionPipeline, side by side.

Same UNet, scheduler (DDPM, sigma_t^2 = beta_t), batch, steps, guidance and initial
latents; both include text encoding, sampling and VAE decoding. Runs are interleaved and
the median is reported, so drift of the machine hits both alike. Then the same generation
with the UNet torch-compiled (``eval.compile``), and with the fine-tuned model of rounds
2..R: DoRA layers as they train, peft's DoRA caching, and the adapter merged into the
weights (``mitune.models.adapters.merged_adapters``, what the MI-rounds callback does). Writes a
Markdown file under docs/benchmarks/.

    python benchmarks/generation.py [--batch 16] [--steps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import peft
import torch
from peft.helpers import DoraCaching

from mitune.mi.pipeline import ddpm_scheduler, decode_latents, latent_shape
from mitune.models.adapters import AdapterConfig, add_adapters, merged_adapters
from mitune.models.builders import build_tiny_pipeline
from mitune.models.loading import compile_unet, load_pipeline
from mitune.rounds.generation import Job, generate_batch
from mitune.rounds.settings import GenerationConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "generation_cpu.md"


class CallCounter:
    """Counts UNet forward calls and the samples they carried."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = 0
        self.samples = 0
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        self.calls += 1
        self.samples += (args[0] if args else kwargs["sample"]).shape[0]

    def reset(self) -> None:
        self.calls = self.samples = 0

    def remove(self) -> None:
        self.handle.remove()


def seeds(batch: int) -> list[int]:
    return list(range(batch))


def run_mitune(pipe, prompts: list[str], config: GenerationConfig) -> None:
    jobs = [Job(i, 0, s) for i, s in enumerate(seeds(len(prompts)))]
    latents = generate_batch(pipe, prompts, jobs, config).latents
    decode_latents(pipe, latents)


def run_diffusers(pipe, prompts: list[str], config: GenerationConfig) -> None:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds(len(prompts))]
    pipe(prompts, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
         generator=generators, output_type="pil")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, alternating between them so drift of the machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    return times


def all_runs(times: dict[str, list[float]]) -> str:
    return "All runs (s): " + "; ".join(f"{k} {[round(t, 3) for t in v]}" for k, v in times.items())


def section_diffusers(pipe, prompts: list[str], config: GenerationConfig, repeats: int) -> list[str]:
    """mitune with MI against diffusers' pipeline, and the UNet calls each makes."""
    counter = CallCounter(pipe.unet)
    runs = {"mitune": lambda: run_mitune(pipe, prompts, config), "diffusers": lambda: run_diffusers(pipe, prompts, config)}
    calls = {}
    for name, run in runs.items():
        counter.reset()
        run()  # warm-up, and count calls
        calls[name] = (counter.calls, counter.samples)
    counter.remove()
    if calls["mitune"] != calls["diffusers"]:
        raise SystemExit(f"UNet calls differ: {calls}")
    times = interleaved(runs, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["| | median s / batch | images/s | UNet calls / batch | samples / UNet call |", "|---|---|---|---|---|"]
    for name, (n_calls, n_samples) in calls.items():
        lines.append(f"| {name} | {med[name]:.3f} | {len(prompts) / med[name]:.1f} | {n_calls} | {n_samples / n_calls:.0f} |")
    lines += ["", f"**Ratio mitune / diffusers: {med['mitune'] / med['diffusers']:.3f}** (target <= 1.03). "
              + all_runs(times), ""]
    return lines


def section_compile(pipe, compiled, prompts: list[str], config: GenerationConfig, repeats: int) -> list[str]:
    """The same generation with the UNet compiled (``mitune.models.loading.compile_unet``, inductor).

    Inductor's on-disk cache is switched off, so the compile time is a first compile's."""
    torch._inductor.config.fx_graph_cache = False
    compile_s = compile_unet(compiled, len(prompts))
    run_mitune(compiled, prompts, config)  # warm-up
    times = interleaved({"eager": lambda: run_mitune(pipe, prompts, config),
                         "compiled": lambda: run_mitune(compiled, prompts, config)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        "## torch.compile of the UNet (`eval.compile=inductor`)",
        "",
        "| UNet | median s / batch | images/s |",
        "|---|---|---|",
        *(f"| {k} | {v:.3f} | {len(prompts) / v:.1f} |" for k, v in med.items()),
        "",
        f"**compiled / eager: {med['compiled'] / med['eager']:.2f}**; compiling took {compile_s:.1f} s once (cold cache) "
        f"(paid back after {compile_s / max(med['eager'] - med['compiled'], 1e-9):.0f} batches). " + all_runs(times),
        "",
    ]


def section_adapters(pipe, base_pipe, prompts: list[str], config: GenerationConfig, repeats: int) -> list[str]:
    """Generation with a (randomised) paper DoRA adapter, applied each way the rounds could, interleaved
    with the same UNet without adapter layers (``base_pipe``)."""
    with torch.no_grad():
        for param in add_adapters(pipe, AdapterConfig()):
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    pipe.unet.eval()

    def run_in(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
        def run() -> None:
            with context():
                run_mitune(pipe, prompts, config)
        return run

    runs = {
        "no adapter (base model)": lambda: run_mitune(base_pipe, prompts, config),
        "DoRA layers (unmerged)": run_in(contextlib.nullcontext),
        "DoRA layers + peft DoRA caching": run_in(DoraCaching),
        "DoRA merged per batch (`merged_adapters`, as the MI-rounds callback does per round)": run_in(
            lambda: merged_adapters(pipe)),
    }
    interleaved(runs, 1)  # warm-up
    times = interleaved(runs, repeats)
    base = statistics.median(times["no adapter (base model)"])
    return [
        "## Generating with the fine-tuned model (rounds 2..R)",
        "",
        f"The paper's adapter (DoRA, rank 32, alpha 32, attention + feed-forward; peft {peft.__version__}) on the "
        "same UNet, weights moved off their identity init; same batch and settings as above, mitune with MI.",
        "",
        "| adapter applied as | median s / batch | vs base model |",
        "|---|---|---|",
        *(f"| {k} | {statistics.median(v):.3f} | {statistics.median(v) / base:.2f} |" for k, v in times.items()),
        "",
        all_runs(times),
        "",
    ]


def tiny_pipeline(path: Path):
    pipe = load_pipeline(str(path))
    pipe.scheduler = ddpm_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_pipeline(Path(tmp) / "tiny-sd")
        pipe, compiled, adapted = tiny_pipeline(path), tiny_pipeline(path), tiny_pipeline(path)
    prompts = [f"a red cube and a blue ball number {i}" for i in range(args.batch)]
    config = GenerationConfig(num_candidates=1, num_inference_steps=args.steps, guidance_scale=7.5,
                              micro_batch=args.batch)
    lines = [
        "# Generation throughput on CPU: mitune (with MI) vs diffusers",
        "",
        f"Command: `python benchmarks/generation.py --batch {args.batch} --steps {args.steps} --repeats {args.repeats}`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- model: tiny random-init SD pipeline (`mitune.models.builders.build_tiny_pipeline`), "
        f"latents {tuple(latent_shape(pipe, 1)[1:])}, UNet {sum(p.numel() for p in pipe.unet.parameters()):,} parameters",
        f"- work: batch {args.batch}, {args.steps} DDPM steps, CFG 7.5, text encoding + sampling + VAE decode",
        "",
        *section_diffusers(pipe, prompts, config, args.repeats),
        *section_compile(pipe, compiled, prompts, config, args.repeats),
        *section_adapters(adapted, pipe, prompts, config, args.repeats),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
