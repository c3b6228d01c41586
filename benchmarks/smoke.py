"""Full-size smoke runs on CPU: a random-init pipeline with the exact architecture of SD-2.1-base or
SDXL-base-1.0 (``mitune.models.builders``, CLIP's real tokenizers) through the real entry points.

``mitune.run`` with the paper's experiment at minimal counts (one prompt, M=2, 2 sampling steps, one
optimizer step of one sample, one round), then ``mitune.evaluate`` for round 1 at CFG 7.5 with the
``mi`` metric, each in its own process with the configs' dtypes. What real sizes bring (memory,
dtypes, SDXL's two text encoders and size conditioning, 77-token padding) shows here before a GPU
session meets it. Writes ``<out>/<kind>/report.json``: parameters per component, the tokenizers'
ids of a prompt, the stages that ran, wall time and the children's peak RSS.

    python benchmarks/smoke.py sd21|sdxl [--out outputs/smoke]

``tiny-sd`` and ``tiny-sdxl`` run the same commands on the tiny pipelines, in seconds (the test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from mitune.models.builders import build_full_pipeline, build_once, build_tiny_pipeline
from mitune.runs.artifacts import RESULTS, RunDir
from mitune.runs.io import write_json

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat"
# kind: (experiment, builder of the model folder)
KINDS = {
    "sd21": ("sd21_paper", lambda out: build_full_pipeline(out, kind="sd21")),
    "sdxl": ("sdxl_paper", lambda out: build_full_pipeline(out, kind="sdxl")),
    "tiny-sd": ("sd21_paper", lambda out: build_tiny_pipeline(out, kind="sd")),
    "tiny-sdxl": ("sdxl_paper", lambda out: build_tiny_pipeline(out, kind="sdxl")),
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
ROUND, CFG = 1, 7.5


def overrides(experiment: str, model: Path) -> list[str]:
    """The paper's experiment at minimal counts, on CPU; the same for both tasks, so evaluate
    composes the config the run was trained with."""
    return [f"+experiment={experiment}", "scale=smoke", f"model.path_or_id={model}", "model.device=cpu",
            "trainer.accelerator=cpu", "logger=csv", "data=demo", "data.limit=1", "rounds=1",
            "generation.num_candidates=2", "generation.num_inference_steps=2", "generation.micro_batch=2",
            "train.effective_batch=1", "train.micro_batch=1", "train.steps_per_round=1"]


def commands(kind: str, model: Path, out: Path) -> dict[str, list[str]]:
    experiment = KINDS[kind][0]
    common = overrides(experiment, model)
    if kind == "sdxl":  # its training step without checkpointing was OOM-killed at 20 GiB (README)
        common += ["train.gradient_checkpointing=true", "train.cache_dora_norm=false"]
    run_dir = out / "run"
    # The mi metric's own pipeline: the same model, two draws of (t, noise), the config's dtype.
    mi = f"{{pipeline:'{model}',n_draws:2,batch_size:1,torch_dtype:bfloat16,device:cpu}}"
    return {
        "run": [sys.executable, "-m", "mitune.run", *common, f"hydra.run.dir={run_dir}"],
        "evaluate": [sys.executable, "-m", "mitune.evaluate", *common, f"run_dir={run_dir}", f"eval.round={ROUND}",
                     f"generation.guidance_scale={CFG}", "eval.num_images=1", "eval.alignment=[mi]",
                     "eval.quality=[]", "eval.category=demo", f"+eval.metric_kwargs.mi={mi}",
                     f"hydra.run.dir={out / 'eval'}"],
    }


def parameters(model: Path) -> dict[str, int]:
    """Parameters per component, from the safetensors headers (nothing is loaded)."""
    counts = {}
    for name in COMPONENTS:
        for file in sorted((model / name).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                shapes = [f.get_slice(key).get_shape() for key in f.keys()]
            counts[name] = counts.get(name, 0) + sum(math.prod(shape) for shape in shapes)
    return counts


def tokenizer_ids(model: Path) -> dict[str, list[int]]:
    """The ids of PROMPT as the pipeline's tokenizers return them to its text encoders (padded to max length)."""
    ids = {}
    for name in TOKENIZERS:
        if (model / name).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(model / name)
            ids[name] = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True).input_ids
    return ids


def stages(out: Path) -> list[str]:
    """Which stages left their outputs: the round's candidates, its adapter, the evaluation's results."""
    run = RunDir(out / "run").round(ROUND)
    done = {"generate": run.is_complete(), "train": run.adapter.is_dir(), "evaluate": (out / "eval" / RESULTS).is_file()}
    return [name for name, ok in done.items() if ok]


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    """Runs ``cmd``; its exit code and its peak RSS in GiB (ru_maxrss, KiB on Linux, of that child alone)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, round(usage.ru_maxrss / 2**20, 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "smoke")
    args = parser.parse_args(argv)
    start = time.monotonic()
    model = build_once(args.out / "models" / args.kind, KINDS[args.kind][1])
    seconds: dict[str, float] = {"build": round(time.monotonic() - start, 1)}  # ~0 once the model is cached
    out = args.out / args.kind
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time: the run dir would otherwise resume
    out.mkdir(parents=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    failed, peaks = None, {}
    for task, cmd in commands(args.kind, model, out).items():
        print(f"{args.kind}: {task} ...", flush=True)
        t0 = time.monotonic()
        code, peaks[task] = run_measured(cmd, env)
        if code:
            failed = task
            break
        seconds[task] = round(time.monotonic() - t0, 1)
    report = {
        "kind": args.kind,
        "params": parameters(model),
        "tokenizer_ids": tokenizer_ids(model),
        "stages": stages(out),
        "wall_s": round(time.monotonic() - start, 1),
        "task_s": seconds,
        "peak_rss_gib": max(peaks.values()),
        "task_peak_rss_gib": peaks,
        "build_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # this process
        "failed": failed,
    }
    write_json(out / "report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "tokenizer_ids"}), flush=True)
    if failed:
        raise SystemExit(f"{args.kind}: mitune.{failed} failed; see its output above")
    return report


if __name__ == "__main__":
    main()
