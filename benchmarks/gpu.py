"""GPU benchmark: MI generation overhead, DoRA/LoRA training step, memory and MFU of a full-size UNet.

A random-init UNet with SD-2.1-base's (or SDXL-base's) exact config, so nothing is downloaded;
random 77-token text embeddings stand in for the text encoder. Measures
``mitune.mi.estimators.sample_with_mi`` against the same DDPM/CFG loop without MI accumulation (the
overhead ratio, target <= 1.03), an optimizer step of accumulated micro-batches for DoRA, DoRA with
mitune's norm cache and LoRA, peak memory, and MFU from FLOPs counted by ``torch.utils.flop_counter``. Runs on CPU at tiny sizes
so that the code stays tested. Writes a Markdown file under docs/benchmarks/.

    python benchmarks/gpu.py [--model sd21|sdxl] [--device auto] [--latent 64|128] [--gen-batches 25 50 100]
                             [--steps 50] [--train-batch 16] [--accumulation 25] [--repeats 3] [--adapters NAME ...]
                             [--compile] [--channels-last]
                             [--peak-tflops 989] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import diffusers
import peft
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from mitune.mi.estimators import Embedding, EpsFn, ddpm_step, paired_eps, sample_with_mi, step_noise
from mitune.models.adapters import UNET_TARGETS, AdapterConfig, DoraNormCache, lora_config
from mitune.models.builders import (
    CLIP_MAX_LENGTH,
    SD21_BASE_UNET,
    SD_DDPM_CONFIG,
    SDXL_BASE_UNET,
    SDXL_TEXT_ENCODER_2,
)
from mitune.models.loading import resolve_device

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
TEXT_LENGTH = CLIP_MAX_LENGTH
GUIDANCE = 7.5
MODELS = {"sd21": SD21_BASE_UNET, "sdxl": SDXL_BASE_UNET}
SDXL_POOLED_DIM = SDXL_TEXT_ENCODER_2["projection_dim"]  # + 6 time ids x 256 = 2816
# name: (adapter, mitune's DoRA norm cache as train.cache_dora_norm switches it on)
ADAPTERS = {"DoRA": (AdapterConfig(use_dora=True), False), "DoRA + norm cache": (AdapterConfig(use_dora=True), True),
            "LoRA": (AdapterConfig(use_dora=False), False)}


# ----------------------------------------------------------------------------- model and inputs


def build_unet(model: str, device: torch.device, channels_last: bool) -> UNet2DConditionModel:
    """The model's UNet architecture with seeded random weights, stored as mitune's configs load
    them: bf16 on CUDA (adapters added later stay fp32, under autocast as in bf16-mixed training),
    fp32 on CPU."""
    torch.manual_seed(0)
    with device:  # initialised where it runs: SDXL takes 30 s to initialise on 2 host cores
        unet = UNet2DConditionModel(**MODELS[model])
    if device.type == "cuda":
        unet = unet.to(torch.bfloat16)
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


def attention_kernels(unet: UNet2DConditionModel) -> str:
    """Which attention implementation the UNet runs (AttnProcessor2_0 = PyTorch SDPA / flash)."""
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return ", ".join(names)


def text_embedding(unet: UNet2DConditionModel, batch: int, device: torch.device, seed: int) -> Embedding:
    """Random conditioning of the shape the model's text encoder(s) would give."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, TEXT_LENGTH, unet.config.cross_attention_dim, generator=g).to(device)
    if unet.config.addition_embed_type != "text_time":
        return hidden
    return {
        "encoder_hidden_states": hidden,
        "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=g).to(device),
        "time_ids": torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).repeat(batch, 1).to(device),
    }


def unet_kwargs(emb: Embedding) -> dict:
    """UNet keyword arguments for a conditioning tensor or SDXL dict."""
    if isinstance(emb, torch.Tensor):
        return {"encoder_hidden_states": emb}
    added = {"text_embeds": emb["text_embeds"], "time_ids": emb["time_ids"]}
    return {"encoder_hidden_states": emb["encoder_hidden_states"], "added_cond_kwargs": added}


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, as generation and training run there; fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_eps_fn(forward: Callable, device: torch.device) -> EpsFn:
    """``forward`` (the UNet, maybe compiled) as ``mitune.mi.estimators``'s eps_fn."""

    def eps_fn(z_t: torch.Tensor, t: torch.Tensor, emb: Embedding) -> torch.Tensor:
        with autocast(device):
            return forward(z_t, t, return_dict=False, **unet_kwargs(emb))[0]

    return eps_fn


def forward_flops(unet: UNet2DConditionModel, batch: int, latent: int, device: torch.device) -> int:
    """FLOPs of one UNet forward at this batch and latent size (counted by running it once)."""
    z = torch.randn(batch, unet.config.in_channels, latent, latent, device=device)
    t = torch.full((batch,), 500, device=device)
    emb = text_embedding(unet, batch, device, seed=0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(device), counter:
        unet(z, t, return_dict=False, **unet_kwargs(emb))
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer must wait for the queued kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict) -> Iterator[None]:
    """Puts the peak memory of the block in ``out["peak"]``: CUDA allocator, else the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:  # ru_maxrss is KiB on Linux; it never goes down, so it bounds every block after the largest
        out["peak"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def sample_plain(eps_fn: EpsFn, z_T: torch.Tensor, emb: Embedding, null_emb: Embedding,
                 scheduler: DDPMScheduler, num_inference_steps: int) -> torch.Tensor:
    """``sample_with_mi``'s loop without MI: the control that prices the MI accumulation."""
    scheduler.set_timesteps(num_inference_steps)
    z = z_T.float() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps.to(z.device)
    for i, t in enumerate(scheduler.timesteps):
        eps_uncond, eps_cond = paired_eps(eps_fn, z, timesteps[i].expand(z.shape[0]), emb, null_emb)
        guided = eps_uncond.float() + GUIDANCE * (eps_cond.float() - eps_uncond.float())
        z = ddpm_step(scheduler, guided, t, z, step_noise(z.shape, None, z.device) if t > 0 else None)
    return z


def bench_generation(unet: UNet2DConditionModel, forward: Callable, batch: int, args: argparse.Namespace,
                     device: torch.device) -> dict:
    """Interleaved MI / plain sampling of one micro-batch; median seconds of each."""
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    eps_fn = make_eps_fn(forward, device)
    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(batch, unet.config.in_channels, args.latent, args.latent, generator=g).to(device)
    emb, null_emb = text_embedding(unet, batch, device, seed=2), text_embedding(unet, batch, device, seed=3)
    runs = {
        "MI": lambda: sample_with_mi(eps_fn, z_T, emb, null_emb, scheduler, num_inference_steps=args.steps,
                                     guidance_scale=GUIDANCE),
        "plain": lambda: sample_plain(eps_fn, z_T, emb, null_emb, scheduler, args.steps),
    }
    warmup = {name: timed(run, device) for name, run in runs.items()}  # includes compilation, if any
    times: dict[str, list[float]] = {name: [] for name in runs}
    mem: dict = {}
    with peak_memory(device, mem):
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device))
    flops = args.steps * forward_flops(unet, 2 * batch, args.latent, device)
    print("generation", batch, {k: [round(t, 3) for t in v] for k, v in times.items()}, flush=True)
    return {"batch": batch, "warmup": warmup, "times": times, "median": {k: statistics.median(v) for k, v in times.items()},
            "flops": flops, "peak": mem["peak"]}


def bench_training(unet: UNet2DConditionModel, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One adapter's optimizer step: ``args.accumulation`` micro-batches of q_sample, forward, eps-MSE and
    backward, then AdamW."""
    config, cache_norm = ADAPTERS[name]
    adapter = "adapter"
    torch.manual_seed(0)
    unet.add_adapter(lora_config(config, UNET_TARGETS[config.targets]), adapter_name=adapter)
    unet.set_adapter(adapter)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    if cache_norm:
        DoraNormCache([unet], optimizer)
    forward = torch.compile(unet) if args.compile else unet
    scheduler = DDPMScheduler(**SD_DDPM_CONFIG)
    g = torch.Generator().manual_seed(4)
    b = args.train_batch
    z0 = torch.randn(b, unet.config.in_channels, args.latent, args.latent, generator=g).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = torch.randint(500, 1000, (b,), generator=g).to(device)
    emb = text_embedding(unet, b, device, seed=5)

    def step() -> None:
        for _ in range(args.accumulation):
            with autocast(device):
                pred = forward(scheduler.add_noise(z0, noise, t), t, return_dict=False, **unet_kwargs(emb))[0]
            F.mse_loss(pred.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = timed(step, device)  # allocator, Adam state, compilation
    mem: dict = {}
    with peak_memory(device, mem):
        times = [timed(step, device) for _ in range(args.repeats)]
    print("training", name, [round(x, 3) for x in times], flush=True)
    unet.eval()
    unet.delete_adapters(adapter)
    unet.requires_grad_(False)
    return {"adapter": name, "trainable": sum(p.numel() for p in trainable), "warmup": warmup, "times": times,
            "median": statistics.median(times), "peak": mem["peak"]}


# ----------------------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if device.type != "cuda":
        return f"CPU: {cpu}"
    props = torch.cuda.get_device_properties(device)
    driver = "n/a"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "n/a"
    return (f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
            f"compute capability {props.major}.{props.minor}, driver {driver}, CUDA {torch.version.cuda}; host {cpu}")


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> str:
    if peak_tflops is None:
        return "n/a"
    return f"{100 * flops / seconds / (peak_tflops * 1e12):.1f}%"


def training_table(args: argparse.Namespace, train: list[dict], train_flops: int) -> list[str]:
    """The training section: one row per adapter measured."""
    config = ADAPTERS["DoRA"][0]
    samples = args.accumulation * args.train_batch
    lines = [
        f"## Training step ({args.accumulation} micro-batches of {args.train_batch} per optimizer step = {samples} "
        f"samples; the paper's batch 400 is 25 x 16)",
        "",
        f"Adapters: rank {config.rank}, alpha {config.alpha}, targets `{config.targets}` "
        f"({', '.join(UNET_TARGETS[config.targets])}); step = per micro-batch q_sample, forward, eps-MSE, backward; "
        "then AdamW. `DoRA + norm cache` is `train.cache_dora_norm` (mitune's default).",
        "",
        "| adapter | trainable params | s / optimizer step | samples/s | TFLOP / sample | MFU | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in train:
        lines.append(
            f"| {r['adapter']} | {r['trainable']:,} | {r['median']:.3f} | {samples / r['median']:.2f} | "
            f"{3 * train_flops / args.train_batch / 1e12:.3f} | "
            f"{mfu(3 * train_flops * args.accumulation, r['median'], args.peak_tflops)} | {r['peak']} |"
        )
    return lines


def report(args: argparse.Namespace, argv: list[str], device: torch.device, params: int, attention: str,
           compile_s: float | None, gen: list[dict], train: list[dict], train_flops: int) -> str:
    peak = args.peak_tflops
    lines = [
        f"# GPU benchmark: {args.model} UNet on {device.type}",
        "",
        f"Command: `python benchmarks/gpu.py {shlex.join(argv)}`",
        "",
        f"- machine: {machine(device)}",
        f"- versions: Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}",
        f"- model: {args.model} UNet config, random init, {params:,} parameters; latents 4x{args.latent}x{args.latent}; "
        f"random {TEXT_LENGTH}-token text embeddings (no text encoder, no VAE); "
        f"{'bf16 weights, bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
        f"torch.compile: {f'yes, first call {compile_s:.1f} s' if compile_s is not None else 'no'}; "
        f"channels-last: {'yes' if args.channels_last else 'no'}; attention: {attention}",
        f"- MFU: FLOPs from `torch.utils.flop_counter.FlopCounterMode` over one UNet forward at the measured shape, "
        f"/ time / {f'{peak:g} TFLOP/s peak' if peak is not None else 'peak (not given: n/a)'}; "
        f"generation = steps x forward of the CFG batch (2 x images); training = 3 x forward",
        f"- repeats: {args.repeats}, median reported; warm-up run excluded",
        "",
        f"## Generation ({args.steps} DDPM steps, CFG {GUIDANCE}, cond + uncond in one UNet call)",
        "",
        "| micro-batch | s / batch with MI | s / batch plain CFG | MI overhead | images/s (MI) | images/s (plain) "
        "| TFLOP / image | MFU (MI) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gen:
        mi, plain = r["median"]["MI"], r["median"]["plain"]
        lines.append(
            f"| {r['batch']} | {mi:.3f} | {plain:.3f} | {mi / plain:.3f} | {r['batch'] / mi:.2f} | "
            f"{r['batch'] / plain:.2f} | {r['flops'] / r['batch'] / 1e12:.3f} | {mfu(r['flops'], mi, peak)} | {r['peak']} |"
        )
    lines += ["", "**MI overhead ratio** (MI / plain, target <= 1.03): "
              + ", ".join(f"batch {r['batch']}: {r['median']['MI'] / r['median']['plain']:.3f}" for r in gen), ""]
    if train:
        lines += training_table(args, train, train_flops)
    runs = [f"gen {r['batch']} {k} {[round(t, 3) for t in v]}" for r in gen for k, v in r["times"].items()]
    runs += [f"train {r['adapter']} {[round(t, 3) for t in r['times']]}" for r in train]
    lines += ["", "All runs (s): " + "; ".join(runs), ""]
    return "\n".join(lines)


@torch.no_grad()
def forward_once(forward: Callable, unet: UNet2DConditionModel, args: argparse.Namespace, device: torch.device) -> None:
    """One forward at the first generation shape: triggers (and so times) torch.compile."""
    batch = 2 * args.gen_batches[0]
    z = torch.randn(batch, unet.config.in_channels, args.latent, args.latent, device=device)
    t = torch.full((batch,), 500, device=device)
    with autocast(device):
        forward(z, t, return_dict=False, **unet_kwargs(text_embedding(unet, batch, device, seed=0)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd21")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side; default the model's native: 64 = 512 px (SD-2.1), 128 = 1024 px (SDXL)")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[25, 50, 100], help="images per micro-batch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train-batch", type=int, default=16, help="training micro-batch")
    parser.add_argument("--accumulation", type=int, default=25, help="micro-batches per optimizer step (paper: 25 x 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", nargs="*", choices=list(ADAPTERS), default=list(ADAPTERS),
                        help="adapters whose training step is measured; none: generation only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--channels-last", action="store_true", help="UNet weights and activations in channels-last")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak for MFU; default 989 (H100 SXM) on CUDA, none on CPU")
    parser.add_argument("--out", type=Path, default=None, help="default docs/benchmarks/gpu_<device>.md")
    args = parser.parse_args(argv)
    args.latent = args.latent or MODELS[args.model]["sample_size"]
    return args


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    out = args.out or DOCS / f"gpu_{device.type}.md"

    unet = build_unet(args.model, device, args.channels_last).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    forward = unet
    compile_s = None
    if args.compile:
        forward = torch.compile(unet)
        compile_s = timed(lambda: forward_once(forward, unet, args, device), device)
    gen = [bench_generation(unet, forward, b, args, device) for b in args.gen_batches]
    train_flops = forward_flops(unet, args.train_batch, args.latent, device) if args.adapters else 0
    train = [bench_training(unet, name, args, device) for name in args.adapters]

    text = report(args, argv, device, params, attention_kernels(unet), compile_s, gen, train, train_flops)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
