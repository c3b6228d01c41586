"""The GPU benchmark suite as one command that fits a short GPU lease.

A smoke run first, then each benchmark in priority order, each in its own process (a crash or an
out-of-memory frees the GPU for the next) under its own time limit, all within one budget. Each
result file is written as soon as its run ends, so a lease cut short still returns what finished;
``gpu_<device>_runs.md`` lists every run's exit and time, ``gpu_<device>.log`` their output.

    python benchmarks/device.py [--out docs/benchmarks] [--budget SECONDS] [--device cuda|cpu]

``--device cpu`` runs the same suite at toy sizes, SDXL left out: the test that keeps it working.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = str(ROOT / "benchmarks" / "gpu.py")
# Appended to every benchmark on CPU (argparse keeps the last value): seconds, not hours.
CPU_SIZES = ["--latent", "8", "--gen-batches", "1", "--steps", "2", "--train-batch", "1", "--accumulation", "1",
             "--repeats", "1"]
MIN_RUN_S = 30  # a run is started only with this much budget left (or its whole limit)
# The main job's CPU smoke: one small round of the embedded toy default.
CPU_RUN = ["rounds=1", "generation.num_candidates=2", "generation.micro_batch=2", "train.effective_batch=2",
           "train.micro_batch=2", "train.steps_per_round=1"]


@dataclass(frozen=True)
class Run:
    name: str
    limit_s: float
    args: list[str]  # after `python`
    result: bool = True  # writes gpu_<device>_<name>.md
    required: bool = False  # the rest is skipped if it fails


def suite(device: str) -> list[Run]:
    """Highest priority first: the issue's targets (SD-2.1 at 512 px), the main job on this device,
    SDXL, then the two optional speed-ups. 20 sampling steps: the per-step cost, and so MI's overhead
    and MFU, is the same at 50."""
    fast = ["--steps", "20", "--repeats", "2"]
    runs = [
        Run("smoke", 90, [GPU, "--latent", "16", "--gen-batches", "2", "--steps", "2", "--train-batch", "2",
                          "--accumulation", "1", "--repeats", "1"], result=False, required=True),
        Run("sd21", 240, [GPU, *fast]),
        Run("run", 180, ["-m", "mitune.run", "logger=csv"], result=False),
        Run("sdxl", 180, [GPU, "--model", "sdxl", "--gen-batches", "8", "16", *fast, "--train-batch", "4",
                          "--accumulation", "4", "--adapters", "DoRA + norm cache"]),
        Run("sd21_compile", 180, [GPU, "--compile", "--gen-batches", "50", *fast, "--adapters"]),
        Run("sd21_channels_last", 120, [GPU, "--channels-last", "--gen-batches", "50", *fast,
                                        "--adapters", "DoRA + norm cache"]),
    ]
    if device == "cpu":
        runs = [replace(r, args=r.args + (CPU_SIZES if r.args[0] == GPU else CPU_RUN)) for r in runs if r.name != "sdxl"]
    return runs


def command(run: Run, device: str, out: Path, scratch: Path) -> list[str]:
    """The run's full command line: where its result file, or the main job's run dir, goes."""
    if run.args[0] != GPU:
        return [sys.executable, *run.args, f"hydra.run.dir={scratch / run.name}", f"trainer.accelerator={device}"]
    target = out / f"gpu_{device}_{run.name}.md" if run.result else scratch / f"{run.name}.md"
    return [sys.executable, *run.args, "--device", device, "--out", str(target)]


def execute(cmd: list[str], timeout: float, log) -> str:
    """Runs ``cmd`` with its output appended to ``log``; kills its whole process group (torch.compile's
    workers too) at the time limit. Returns how it ended."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # mitune uninstalled, as there
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"killed at its {timeout:.0f} s limit"
    return "ok" if code == 0 else f"failed (exit {code})"


Row = tuple[str, str, str, str]  # run, how it ended, seconds, command


def write_table(path: Path, rows: list[Row], argv: list[str], budget: float | None) -> None:
    """The runs so far: rewritten after each, so a lease cut short still says what ran."""
    lines = [f"# GPU benchmark suite: `python benchmarks/device.py {shlex.join(argv)}`", "",
             f"Budget: {f'{budget:.0f} s' if budget else 'none'}. Output of every run: the `.log` file beside this.", "",
             "| run | result | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {secs} | `{cmd}` |" for name, status, secs, cmd in rows]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole suite; default no limit")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget if args.budget else float("inf")
    rows: list[Row] = []
    table = args.out / f"gpu_{args.device}_runs.md"
    stop = ""
    with tempfile.TemporaryDirectory() as scratch, open(args.out / f"gpu_{args.device}.log", "w") as log:
        for run in suite(args.device):
            cmd = command(run, args.device, args.out, Path(scratch))
            shown = shlex.join(cmd[1:]).replace(str(ROOT) + "/", "").replace(scratch, "<tmp>")
            left = deadline - time.monotonic()
            if stop or left < min(MIN_RUN_S, run.limit_s):
                rows.append((run.name, stop or "skipped: budget spent", "", shown))
            else:
                print(f"\n===== {run.name}: {shown}", file=log, flush=True)
                start = time.monotonic()
                status = execute(cmd, min(run.limit_s, left), log)
                rows.append((run.name, status, f"{time.monotonic() - start:.0f}", shown))
                print(f"===== {run.name}: {status}", file=log, flush=True)
                print(f"{run.name}: {status} ({rows[-1][2]} s)", flush=True)
                if run.required and status != "ok":
                    stop = f"skipped: {run.name} {status}"
            write_table(table, rows, argv, args.budget)
    return rows


if __name__ == "__main__":
    main()
