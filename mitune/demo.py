"""``make demo`` (``python -m mitune.demo [--out DIR]``): the design card end to end on the embedded toy model, offline.

Three commands a user would type, each run as they would run it (its own process): train R=2 rounds
(``mitune.run +experiment=demo``), evaluate rounds 0..2 over a CFG grid as one evaluation multirun
(``mitune.evaluate -m +experiment=demo_eval``: alignment by the toy oracle, quality by ``toy_fd``),
and summarise (``mitune.summary``: Table 1, Table 2, ``tradeoff.png`` and the W&B trade-off charts).
Ends by saying where the tables, the plot and the W&B runs are, and how to look at the trade-off in W&B.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

EVAL_EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "demo_eval.yaml"


def grid() -> dict[str, list[str]]:
    """The evaluation sweep's values per key, as experiments/demo_eval.yaml sets them (Table 1 shows each CFG)."""
    params = yaml.safe_load(EVAL_EXPERIMENT.read_text(encoding="utf-8"))["hydra"]["sweeper"]["params"]
    return {key: str(values).split(",") for key, values in params.items()}


CFGS = tuple(grid()["generation.guidance_scale"])


def commands(out: Path) -> list[tuple[str, list[str]]]:
    """(what, command) per stage; the commands print as a user would type them."""
    run, sweep = out / "run", out / "eval"
    return [
        ("train R=2", ["-m", "mitune.run", "+experiment=demo", f"hydra.run.dir={run}"]),
        (f"evaluate rounds {'/'.join(grid()['eval.round'])} x CFG {'/'.join(CFGS)}",
         ["-m", "mitune.evaluate", "-m", "+experiment=demo_eval", f"run_dir={run}", f"hydra.sweep.dir={sweep}"]),
        ("summarise", ["-m", "mitune.summary", str(sweep), "--out", str(out / "summary"), "--quality", "toy_fd",
                       "--cfg", *CFGS]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mitune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default outputs/demo/<time>)")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs/demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    start = time.monotonic()
    wandb_line = ""
    for i, (what, command) in enumerate(commands(out), 1):
        print(f"== mitune demo {i}/3, {what}: python {' '.join(command)}", flush=True)
        last = i == 3
        done = subprocess.run([sys.executable, *command], stdout=subprocess.PIPE if last else None, text=True, check=False)
        if done.returncode:
            print(f"mitune demo: stage {i} ({what}) failed with exit status {done.returncode}", file=sys.stderr)
            return done.returncode
        if last:  # the summary's file list is said below, once; its W&B line is kept
            wandb_line = next((line for line in done.stdout.splitlines() if line.startswith("W&B:")), "")
    summary = out / "summary"
    print(f"mitune demo: done in {(time.monotonic() - start) / 60:.1f} min; outputs in {out}\n"
          f"  Table 1 (alignment by category, CFG {', '.join(CFGS)}): {summary / 'table1.md'}\n"
          f"  Table 2 (quality, toy_fd):                  {summary / 'table2.md'}\n"
          f"  trade-off plot:                             {summary / 'tradeoff.png'} (points: tradeoff.csv)\n"
          f"  {wandb_line or 'W&B: no summary run'}\n"
          f"  W&B (offline, no account needed): upload every run of the demo with\n"
          f"    wandb sync {out}/run/wandb/offline-run-* {out}/eval/*/wandb/offline-run-* {out}/summary/wandb/offline-run-*\n"
          f"  then open the summary run's summary/tradeoff_<category> charts, or add a scatter panel over the group "
          f"{out / 'eval'} (x eval/all/toy_fd, y eval/all/toy_oracle): one point per (round, CFG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
