"""Scaling of a generation round: time vs M (candidates per prompt), prompts and devices (DDP ranks).

Measured on CPU with the tiny random-init pipeline: the full ``run_round`` (text encoding, sampling
with fused MI, VAE decode, PNG + safetensors writes, selection, metadata) into temporary dirs,
1 torch thread per process, median of repeats after one warm-up round per point. Ranks are
separate processes sharing one round dir, as the Lightning DDP path does: rank r takes every W-th
micro-batch (whole prompts) with ``generate_round``, then ``select_round`` runs once. A cost model (per micro-batch + per image + fixed)
is fitted to the single-rank points and predicts the multi-rank ones. The GPU section is modelled, not measured: UNet FLOPs of SD-2.1-base and
SDXL counted on the meta device, divided by peak x an assumed MFU. Writes scaling.md and scaling.png.

    python benchmarks/scaling.py [--steps 10] [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator
from scipy.optimize import nnls

from mitune.models.builders import build_tiny_pipeline
from mitune.models.loading import load_pipeline
from mitune.rounds.generation import Job, generate_round, micro_batches, rank_batches
from mitune.rounds.loop import run_round
from mitune.rounds.selection import select_round
from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import RoundDir
from mitune.runs.io import save_figure

ROOT = Path(__file__).resolve().parent.parent
GPUS = {"H100": 989.0, "A100": 312.0}  # dense bf16 peak, TFLOP/s
MFUS = (0.45, 0.20)  # the project's target, and a pessimistic case
GPU_MODELS = {"SD-2.1-base 512 px": ("sd21", 64), "SDXL 1024 px": ("sdxl", 128)}
PAPER = {"prompts": 700, "candidates": 50, "steps": 50, "hours": 24.0}  # one round on one A100-80GB
GPU_COUNTS = (1, 2, 4, 8)


@dataclass
class Point:
    """One measured round shape and its timings."""

    sweep: str  # "M", "P" or "W"
    prompts: int
    candidates: int
    micro_batch: int
    world_size: int = 1
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds per rank / wall seconds: the share of a core it got
    rows: int = 0  # rows of metadata.jsonl in the last round: P x M when the round is complete

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def core_share(self) -> float:
        return statistics.median(self.cpu)


def rank_load(prompts: int, candidates: int, micro_batch: int, world_size: int, rank: int = 0) -> tuple[int, int]:
    """(micro-batches, images) of one rank, from mitune's own cut and rank split; rank 0 is the
    busiest, as it takes the first of every W groups and only the last batch can be short."""
    jobs = [Job(pid, c, 0) for pid in range(prompts) for c in range(candidates)]
    mine = rank_batches(micro_batches(jobs, micro_batch), rank, world_size)
    return len(mine), sum(map(len, mine))


def features(p: Point) -> list[float]:
    """The cost model's terms for the critical path: rank 0's batches and images, and 1."""
    return [*rank_load(p.prompts, p.candidates, p.micro_batch, p.world_size), 1.0]


def fit(points: list[Point]) -> np.ndarray:
    """Seconds per micro-batch, per image and per round, from the single-rank points only: the constants describe
    one rank's work, and ranks > 1 then test the model's claim that they never slow each other. Least squares with
    the constants >= 0, as a negative cost means nothing (on a CPU, small batches are no slower per image, which
    plain least squares turns into a negative per-batch cost)."""
    single = [p for p in points if p.world_size == 1]
    return nnls(np.array([features(p) for p in single]), np.array([p.median for p in single]))[0]


def predict(coef: np.ndarray, p: Point) -> float:
    return float(np.dot(features(p), coef))


def prompt_list(n: int) -> list[str]:
    return [f"a red cube and a blue ball number {i}" for i in range(n)]


def make_config(candidates: int, micro_batch: int, steps: int) -> GenerationConfig:
    return GenerationConfig(num_candidates=candidates, micro_batch=micro_batch, num_inference_steps=steps)


def time_rounds(p: Point, repeats: int, tmp: Path, run: Callable[[Path], list[float]]) -> Point:
    """Times ``run`` (which returns each rank's CPU seconds) on fresh round dirs, the first a warm-up; a timing of
    an incomplete round would mislead."""
    for _ in range(repeats + 1):
        round_dir = Path(tempfile.mkdtemp(dir=tmp))
        start = time.perf_counter()
        cpu = run(round_dir)
        p.times.append(time.perf_counter() - start)
        p.cpu.append(statistics.mean(cpu) / p.times[-1])
        p.rows = len(RoundDir(round_dir).rows())
        if p.rows != p.prompts * p.candidates:
            raise RuntimeError(f"{round_dir} has {p.rows} rows, expected {p.prompts} x {p.candidates}")
    p.times, p.cpu = p.times[1:], p.cpu[1:]
    return p


def measure_local(pipe, p: Point, steps: int, repeats: int, tmp: Path) -> Point:
    """Rounds in this process, world size 1."""
    config = make_config(p.candidates, p.micro_batch, steps)

    def run(round_dir: Path) -> list[float]:
        start = time.process_time()
        run_round(pipe, prompt_list(p.prompts), config, round_dir, progress=False)
        return [time.process_time() - start]

    return time_rounds(p, repeats, tmp, run)


def worker(spec: dict) -> None:
    """One rank: load the pipeline, then run every round dir read from stdin, answering 'done <CPU seconds>'."""
    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()
    pipe = load_pipeline(spec["pipe"])
    prompts = prompt_list(spec["prompts"])
    config = make_config(spec["candidates"], spec["micro_batch"], spec["steps"])
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.process_time()
        generate_round(pipe, prompts, config, line.strip(), progress=False, rank=spec["rank"], world_size=spec["world_size"])
        print("done", time.process_time() - start, flush=True)


def expect(proc: subprocess.Popen, word: str, log: Path) -> list[str]:
    """Read the worker's stdout up to the line starting with ``word``, returning the rest; if the worker died,
    fail with the end of its log."""
    for line in proc.stdout:
        if line.split()[:1] == [word]:
            return line.split()[1:]
    raise RuntimeError(f"scaling worker exited with {proc.wait()} before '{word}':\n{log.read_text()[-3000:]}")


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A worker talking over stdin/stdout, its stderr into ``log``."""
    with log.open("w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)


def measure_ranks(pipe_path: Path, p: Point, steps: int, repeats: int, tmp: Path) -> Point:
    """W worker processes share each round dir, then it is selected once; timed from 'go' to the merged metadata,
    start-up excluded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    spec = {"pipe": str(pipe_path), "prompts": p.prompts, "candidates": p.candidates, "micro_batch": p.micro_batch,
            "steps": steps, "world_size": p.world_size}
    config = make_config(p.candidates, p.micro_batch, steps)  # the workers' (selection runs here, once)
    logs = [tmp / f"rank{r}_of_{p.world_size}.log" for r in range(p.world_size)]  # stderr: loading bars, warnings
    procs = [spawn([sys.executable, __file__, "--worker", json.dumps({**spec, "rank": r})], env, log)
             for r, log in enumerate(logs)]

    def run(round_dir: Path) -> list[float]:
        for proc in procs:
            proc.stdin.write(f"{round_dir}\n")
            proc.stdin.flush()
        cpu = [float(expect(proc, "done", log)[0]) for proc, log in zip(procs, logs)]
        select_round(round_dir, p.prompts, config)
        return cpu

    try:
        for proc, log in zip(procs, logs):
            expect(proc, "ready", log)
        return time_rounds(p, repeats, tmp, run)
    finally:
        for proc in procs:
            proc.communicate(timeout=60)  # EOF on stdin ends the worker


def flops_per_image(model: str, latent: int, steps: int) -> float:
    """UNet FLOPs of one image: steps x one forward of the CFG pair, counted on meta (no weights).

    The configs and counter come from benchmarks/gpu.py, loaded by path as benchmarks/ is not a package.
    """
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", Path(__file__).with_name("gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu.MODELS[model])
    return steps * gpu.forward_flops(unet, 2, latent, torch.device("meta"))


def round_hours(flops: float, peak_tflops: float, mfu: float, gpus: int, prompts: int = PAPER["prompts"],
                candidates: int = PAPER["candidates"]) -> float:
    """Ideal data parallel: each GPU generates ceil(prompts / gpus) prompts x M images; only the UNet costs."""
    return -(-prompts // gpus) * candidates * flops / (peak_tflops * 1e12 * mfu) / 3600


def measured_table(points: list[Point], coef: np.ndarray) -> list[str]:
    lines = ["| sweep | P | M | micro-batch | W | images | batches (rank 0) | metadata rows | median s | ms / image "
             "| core share | model s | error | all runs (s) |", "|---" * 14 + "|"]
    for p in points:
        images, fitted = p.prompts * p.candidates, predict(coef, p)
        lines.append(f"| {p.sweep} | {p.prompts} | {p.candidates} | {p.micro_batch} | {p.world_size} | {images} | "
                     f"{features(p)[0]:.0f} | {p.rows} | {p.median:.3f} | {1e3 * p.median / images:.1f} | "
                     f"{p.core_share:.2f} | {fitted:.3f}{' (predicted)' * (p.world_size > 1)} | "
                     f"{100 * (fitted / p.median - 1):+.1f}% | {[round(t, 3) for t in p.times]} |")
    return lines


def fit_errors(points: list[Point], coef: np.ndarray) -> list[float]:
    """|model / measured - 1| over the points the model was fitted to."""
    return [abs(predict(coef, p) / p.median - 1) for p in points if p.world_size == 1]


def gpu_tables(flops: dict[str, float]) -> list[str]:
    lines = ["| model | GPU | MFU | TFLOP / image | s / image | "
             + " | ".join(f"{g} GPU{'s' * (g > 1)} (h)" for g in GPU_COUNTS) + " |", "|---|---|---|---|---|"
             + "---|" * len(GPU_COUNTS)]
    for name, f in flops.items():
        for gpu, peak in GPUS.items():
            for mfu in MFUS:
                lines.append(f"| {name} | {gpu} | {mfu:.0%} | {f / 1e12:.1f} | {f / (peak * 1e12 * mfu):.3f} | "
                             + " | ".join(f"{round_hours(f, peak, mfu, g):.2f}" for g in GPU_COUNTS) + " |")
    lines += ["", f"Round time vs M ({PAPER['prompts']} prompts, H100 at {MFUS[0]:.0%} MFU, hours):", "",
              "| M | images | " + " | ".join(f"{m}, 1 GPU | {m}, 8 GPUs" for m in flops) + " |",
              "|---|---|" + "---|---|" * len(flops)]
    for m in (10, 25, 50, 100):
        hours = [round_hours(f, GPUS["H100"], MFUS[0], g, candidates=m) for f in flops.values() for g in (1, 8)]
        lines.append(f"| {m} | {PAPER['prompts'] * m:,} | " + " | ".join(f"{h:.2f}" for h in hours) + " |")
    return lines


def findings(points: list[Point], coef: np.ndarray, flops: dict[str, float]) -> str:
    """The few sentences the numbers support, computed so that a rerun keeps them true."""
    big = max(points, key=lambda p: p.median)
    per_image = coef[1] * features(big)[1] / predict(coef, big)
    w = {p.world_size: p for p in points if p.sweep == "W"}
    sd, xl = flops.values()
    seconds = PAPER["hours"] * 3600 / (PAPER["prompts"] * PAPER["candidates"])
    text = (f"For one process, the model linear in images and micro-batches fits the measured rounds to a median "
            f"{statistics.median(fit_errors(points, coef)):.1%} error; in the largest round its per-image term "
            f"(sampling, decode, writes) is {per_image:.0%} of the time. ")
    if 1 in w and len(w) > 1:
        top = max(w)
        ideal = predict(coef, w[1]) / predict(coef, w[top])
        text += (f"{top} ranks run the devices workload {w[1].median / w[top].median:.2f}x as fast as one, where the "
                 f"model, in which ranks never slow each other, predicts {ideal:.2f}x; each rank got "
                 f"{w[top].core_share:.0%} of a core (one rank alone: {w[1].core_share:.0%}). ")
    return text + (
        f"Modelled on GPUs, the paper's round (700 x M=50) is {round_hours(sd, GPUS['H100'], MFUS[0], 1):.1f} h of "
        f"SD-2.1-base UNet work on one H100 at {MFUS[0]:.0%} MFU and {round_hours(sd, GPUS['H100'], MFUS[0], 8):.2f} h "
        f"on 8; SDXL costs {xl / sd:.1f}x as much per image. The paper's ~{PAPER['hours']:g} h on one A100 is "
        f"{seconds:.2f} s per image, i.e. {sd / (seconds * GPUS['A100'] * 1e12):.0%} MFU by this FLOP count "
        f"(A100 at {MFUS[0]:.0%} MFU: {round_hours(sd, GPUS['A100'], MFUS[0], 1):.1f} h), so either its sampling "
        "ran far below the compute bound or much of its time went outside the UNet; `benchmarks/gpu.py` measures "
        "the real MFU, which replaces the assumed one here.")


def plot(points: list[Point], coef: np.ndarray, flops: dict[str, float], path: Path) -> None:
    """Measured medians with the fitted model, one panel per sweep, and the modelled GPU round."""
    fig = Figure(figsize=(12, 8.5), layout="tight")  # no pyplot: Agg canvas, no global backend state
    axes = fig.subplots(2, 2).ravel()
    sweeps = [("M", "candidates", "M (candidates per prompt)"), ("P", "prompts", "prompts P"),
              ("W", "world_size", f"ranks W (processes, 1 thread each; {os.cpu_count()} cores here)")]
    for ax, (sweep, key, label) in zip(axes, sweeps):
        pts = [p for p in points if p.sweep == sweep]
        xs = [getattr(p, key) for p in pts]
        grid = range(min(xs), max(xs) + 1)
        ax.plot(grid, [predict(coef, replace(pts[0], **{key: x})) for x in grid], "-", color="C1", label="fitted model")
        ax.plot(xs, [p.median for p in pts], "o", color="C0", label="measured (median)")
        if sweep == "W":
            ax.plot(grid, [pts[0].median / x for x in grid], ":", color="gray", label="ideal (W=1 / W)")
            ax.set_xticks(list(grid))
        p0 = pts[0]
        fixed = {"M": f"P={p0.prompts}", "P": f"M={p0.candidates}", "W": f"P={p0.prompts}, M={p0.candidates}"}[sweep]
        ax.set(xlabel=label, ylabel="round time (s)", ylim=(0, None),
               title=f"measured, CPU: {fixed}, micro-batch {p0.micro_batch}")
        ax.legend(fontsize=8)
    ax = axes[3]
    for (name, f), color in zip(flops.items(), ("C2", "C3")):
        for (gpu, peak), style in zip(GPUS.items(), ("-o", "--s")):
            ax.plot(GPU_COUNTS, [round_hours(f, peak, MFUS[0], g) for g in GPU_COUNTS], style, color=color,
                    label=f"{name}, {gpu}")
    ax.plot([1], [PAPER["hours"]], "k*", markersize=12, label="paper, 1 A100 (reported)")
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="round time (h)",
           title=f"MODELLED, not measured: 700 prompts x M=50, {MFUS[0]:.0%} MFU")
    ax.set_xticks(GPU_COUNTS, [str(g) for g in GPU_COUNTS])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=8)
    save_figure(path, fig, dpi=100)


def report(argv: list[str], args: argparse.Namespace, points: list[Point], coef: np.ndarray, flops: dict[str, float],
           load: tuple[float, float]) -> str:
    errors = fit_errors(points, coef)
    return "\n".join([
        "# Scaling of a generation round: M, prompts, devices",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/scaling.py', *argv])}`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread per process, "
        f"1-min load average {load[0]:.2f} before / {load[1]:.2f} after; Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"- measured: tiny random-init SD pipeline (`build_tiny_pipeline`, 32 px images), full `run_round` (text "
        f"encoding, {args.steps} DDPM steps with CFG 7.5 and fused MI, VAE decode, PNG + safetensors writes, top-1 "
        f"selection, metadata); median of {args.repeats} repeats after a warm-up round per point",
        f"- devices: W worker processes (1 thread each, started and warmed up before timing) share one round dir, "
        f"rank r taking every W-th micro-batch (whole prompts), then `select_round` once, as under Lightning DDP; this machine has "
        f"{os.cpu_count()} cores, so W={os.cpu_count()} is the most it can measure",
        "- cost model: time = a x micro-batches + c x images + d on rank 0 (the busiest: ranks take every W-th batch "
        "group and only the last can be short). Sampling, decode and writes all grow with images, so they share c. Fitted "
        "to the single-rank points; for W > 1 it predicts, assuming ranks never slow each other",
        "- core share: CPU seconds of each rank's process / wall seconds (1.0 = a whole core; less means it waited "
        "for I/O or for a core taken by other work)",
        "",
        "## Measured (CPU)",
        "",
        *measured_table(points, coef),
        "",
        f"Fit (non-negative least squares over the {len(errors)} single-rank points): "
        f"a = {coef[0] * 1e3:.1f} ms per micro-batch, "
        f"c = {coef[1] * 1e3:.2f} ms per image, d = {coef[2] * 1e3:.1f} ms per round; relative error "
        f"median {statistics.median(errors):.1%}, max {max(errors):.1%}.",
        "",
        "## GPU projection (modelled, not measured)",
        "",
        f"UNet FLOPs counted by `torch.utils.flop_counter` on the meta device (full-size configs from "
        f"`benchmarks/gpu.py`, no weights): {PAPER['steps']} steps x one forward of the CFG pair (2 samples); "
        f"time = FLOPs / (peak x MFU), dense bf16 peaks {', '.join(f'{g} {t:g} TFLOP/s' for g, t in GPUS.items())}. "
        f"The paper's round, {PAPER['prompts']} prompts x M={PAPER['candidates']}, ideally data parallel: each GPU "
        f"gets ceil({PAPER['prompts']} / GPUs) prompts and nothing else costs time (no text encoder, VAE decode, "
        "image writes or start-up).",
        "",
        *gpu_tables(flops),
        "",
        "## What it shows",
        "",
        findings(points, coef, flops),
        "",
        "![scaling](scaling.png)",
        "",
    ])


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="M sweep")
    parser.add_argument("--m-prompts", type=int, default=4, help="prompts in the M sweep")
    parser.add_argument("--ps", type=int, nargs="+", default=[1, 2, 4, 8], help="prompts sweep")
    parser.add_argument("--p-candidates", type=int, default=8, help="M in the prompts sweep")
    parser.add_argument("--micro-batch", type=int, default=16, help="micro-batch of the M and prompts sweeps")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="ranks (processes)")
    parser.add_argument("--ddp", type=int, nargs=3, default=[8, 8, 8], metavar=("P", "M", "B"),
                        help="prompts, M and micro-batch of the devices sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipe_path = build_tiny_pipeline(Path(tmp) / "tiny-sd")
            pipe = load_pipeline(str(pipe_path))
            points = [Point("M", args.m_prompts, m, args.micro_batch) for m in args.ms]
            points += [Point("P", n, args.p_candidates, args.micro_batch) for n in args.ps]
            points = [measure_local(pipe, p, args.steps, args.repeats, Path(tmp)) for p in points]
            points += [measure_ranks(pipe_path, Point("W", *args.ddp, world_size=w), args.steps, args.repeats,
                                     Path(tmp)) for w in args.worlds]
    finally:
        torch.set_num_threads(threads)
    coef = fit(points)
    flops = {name: flops_per_image(model, latent, PAPER["steps"]) for name, (model, latent) in GPU_MODELS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(points, coef, flops, args.out / "scaling.png")
    text = report(argv, args, points, coef, flops, (load_before, os.getloadavg()[0]))
    (args.out / "scaling.md").write_text(text)
    print(text)
    return args.out / "scaling.md"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a rank started by measure_ranks
        worker(json.loads(sys.argv[2]))
    else:
        main()
