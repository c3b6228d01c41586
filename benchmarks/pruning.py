"""Successive halving by partial MI (``generation.prune``) on the toy model: what it saves and what it costs.

Three stages, each resumable (``--out`` keeps what is done):

``trace``: full sampling (no pruning) of M candidates for the toy train prompts, with every candidate's
partial MI after every step, its final MI, and its image's oracle score (``toy_oracle``) and object count.
Sampled by ``ContinuousSampler``, so a pruned run's finished candidates are these very candidates (bit for
bit, tests/test_pruning.py): any schedule can then be replayed exactly from the trace (who is stopped at
each point, which candidate is picked, how many UNet rows it took) without sampling again.

``simulate``: a grid of schedules replayed on the traces: UNet rows relative to full sampling, top-1
agreement with full MI, and the oracle score of the pick minus full MI's pick, paired per (generation
seed, prompt), with a crossed bootstrap CI over seeds and prompts (``mitune.contrasts``). Controls: the
oracle's own pick must beat MI's, a random pick must not.

``rows``: UNet rows of the recommended schedule against full sampling as a round grows (the tail's share).

``wall``: real rounds (``generate_round``) on a few prompts: full sampling with the writer thread off (as
before it) and on, and pruned with the recommended schedule; wall time per stage, UNet rows, and a check
that the real pruned round picks what the replay says.

What docs/benchmarks/pruning*.md hold (about 45 min on a loaded 2-core CPU):

    OMP_NUM_THREADS=1 python benchmarks/pruning.py trace --m 50 --steps 25 --prompts 6 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/pruning.py trace --m 8 16 --steps 25 --prompts 8 --seeds 0 1 2
    python benchmarks/pruning.py simulate --out docs/benchmarks/pruning_replay.md
    OMP_NUM_THREADS=1 python benchmarks/pruning.py wall --m 8 16 50 --wall-prompts 20 10 4 --out docs/benchmarks/pruning_wall.md
    OMP_NUM_THREADS=1 python benchmarks/pruning.py rows --m 50 --out docs/benchmarks/pruning_rows.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mitune.contrasts import crossed_bootstrap
from mitune.metrics import build_alignment_metric
from mitune.mi.pipeline import decode_latents
from mitune.mi.sampler import Candidate, ContinuousSampler, kept_count
from mitune.models.loading import load_pipeline
from mitune.rounds.generation import generate_round
from mitune.rounds.selection import select_round
from mitune.rounds.settings import GenerationConfig, prune_step
from mitune.runs import io as mio
from mitune.runs.artifacts import finished
from mitune.runs.seeds import candidate_seed
from mitune.toy.base_model import MODEL_DIR
from mitune.toy.prompts import load_toy

TRACES = Path("outputs/pruning/trace")
ROWS = 40  # the toy benchmark's micro_batch (conf/scale/toy.yaml)
RECOMMENDED = ((0.25, 0.5), (0.5, 0.4))
# Schedules replayed: (fraction of steps done, fraction kept) pairs.
GRID = {
    "1 x halve @0.4": ((0.4, 0.5),),
    "1 x keep 1/4 @0.3": ((0.3, 0.25),),
    "2 x halve @0.4, 0.7": ((0.4, 0.5), (0.7, 0.5)),
    "2 x halve @0.25, 0.5": ((0.25, 0.5), (0.5, 0.5)),
    "recommended: halve @0.25, keep 0.4 @0.5": RECOMMENDED,
    "3 x halve @0.2, 0.4, 0.6": ((0.2, 0.5), (0.4, 0.5), (0.6, 0.5)),
    "keep 1/5 @0.2": ((0.2, 0.2),),
    "keep 1/10 @0.1": ((0.1, 0.1),),
}


class TracingSampler(ContinuousSampler):
    """``ContinuousSampler`` that records every candidate's MI after each of its steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trace: dict[tuple[int, int], list[float]] = defaultdict(list)

    def _step(self, i, rows, z, acc, eps_cond, eps_uncond, slots) -> None:
        super()._step(i, rows, z, acc, eps_cond, eps_uncond, slots)
        for row, value in zip(rows, acc[rows].tolist()):
            c = slots[row].candidate
            self.trace[c.group, c.index].append(value)


def trace_dir(root: Path, m: int, steps: int, seed: int) -> Path:
    return root / f"M{m}-S{steps}-seed{seed}"


def trace(args: argparse.Namespace) -> None:
    pipe = load_pipeline(str(MODEL_DIR))
    prompts = load_toy("train", per_category=15).prompts[: args.prompts]
    oracle, objects = build_alignment_metric("toy_oracle", progress=False), build_alignment_metric("toy_objects", progress=False)
    for m, steps, seed in itertools.product(args.m, args.steps, args.seeds):
        out = trace_dir(args.traces, m, steps, seed)
        config = GenerationConfig(num_candidates=m, num_inference_steps=steps, seed=seed, micro_batch=ROWS)
        todo = [pid for pid in range(len(prompts)) if not (out / f"{pid:04d}.json").is_file()]
        if not todo:
            continue
        sampler = TracingSampler(pipe, config.sampling, ROWS)
        started = time.perf_counter()
        candidates = [Candidate(pid, c, prompts[pid], candidate_seed(seed, prompts[pid], c)) for pid in todo for c in range(m)]
        for pid, outcomes in sampler.run(candidates):
            images = decode_latents(pipe, torch.stack([o.latents for o in outcomes]))
            mio.write_json(out / f"{pid:04d}.json", {
                "prompt": prompts[pid], "m": m, "steps": steps, "seed": seed,
                "trace": [sampler.trace.pop((pid, c)) for c in range(m)], "mi": [o.mi for o in outcomes],
                "oracle": oracle.score(images, [prompts[pid]] * m).tolist(),
                "objects": objects.score(images, [prompts[pid]] * m).tolist()})
        print(f"trace M={m} steps={steps} seed={seed}: {len(todo)} prompts in {time.perf_counter() - started:.0f} s", flush=True)


def best(values: list[float], among: list[int]) -> int:
    """The highest value's index among ``among``; ties to the lower index, as selection breaks them."""
    return min(among, key=lambda c: (-values[c], c))


def replay(cell: dict, schedule: tuple[tuple[float, float], ...], top_k: int = 1) -> tuple[int, int]:
    """(the pick, UNet row-steps) of one prompt under ``schedule``: what ``ContinuousSampler`` does."""
    steps, alive, done = cell["steps"], list(range(cell["m"])), 0
    rows = 0
    for fraction, keep in schedule:
        s = prune_step(fraction, steps)
        rows += len(alive) * (s - done)
        ranked = sorted(alive, key=lambda c: (-cell["trace"][c][s - 1], c))
        alive, done = sorted(ranked[: kept_count(len(alive), keep, top_k)]), s
    rows += len(alive) * (steps - done)
    return best(cell["mi"], alive), 2 * rows


def load_cells(root: Path, m: int, steps: int) -> dict[int, list[dict]]:
    """seed -> the prompts' traces, in prompt order (only prompts traced under every seed)."""
    seeds = {int(d.name.rsplit("seed", 1)[1]): d for d in root.glob(f"M{m}-S{steps}-seed*") if d.is_dir()}
    names = set.intersection(*({p.name for p in d.glob("*.json")} for d in seeds.values())) if seeds else set()
    return {s: [json.loads((d / n).read_text()) for n in sorted(names)] for s, d in sorted(seeds.items())}


def paired(cells: dict[int, list[dict]], pick) -> tuple[float, float, float, np.ndarray]:
    """Mean oracle(pick) - oracle(full MI's pick) over (seed, prompt) cells, with its crossed bootstrap CI."""
    diffs = np.array([[c["oracle"][pick(c)] - c["oracle"][best(c["mi"], list(range(c["m"])))] for c in row]
                      for row in cells.values()])
    low, high = crossed_bootstrap(diffs)
    return float(diffs.mean()), low, high, diffs


def simulate(args: argparse.Namespace) -> str:
    lines = []
    settings = sorted({tuple(int(x[1:]) for x in d.name.split("-")[:2]) for d in args.traces.glob("M*-S*-seed*")})
    rng = np.random.default_rng(0)
    summary = {}
    for m, steps in settings:
        cells = load_cells(args.traces, m, steps)
        if not cells:
            continue
        n_prompts = len(next(iter(cells.values())))
        full_oracle = np.mean([c["oracle"][best(c["mi"], list(range(m)))] for row in cells.values() for c in row])
        lines += [f"### M={m}, {steps} steps ({len(cells)} generation seeds x {n_prompts} toy train prompts)", "",
                  f"Full MI: UNet rows {2 * m * steps} per prompt; its pick's mean oracle score {full_oracle:.3f}.", "",
                  ("| schedule | steps of the points | candidates after each | UNet rows / full | top-1 = full MI's | "
                   "oracle(pick) - oracle(full MI's pick) [95% CI] |"), "|---|---|---|---|---|---|"]
        for name, schedule in GRID.items():
            points = [prune_step(f, steps) for f, _ in schedule]
            if any(not 1 <= s < steps for s in points) or any(b <= a for a, b in itertools.pairwise(points)):
                continue
            alive, counts = m, []
            for _, keep in schedule:
                alive = kept_count(alive, keep, 1)
                counts.append(alive)
            picks = {id(c): replay(c, schedule) for row in cells.values() for c in row}
            rows = np.mean([r for _, r in picks.values()]) / (2 * m * steps)
            agree = np.mean([p == best(c["mi"], list(range(m))) for row in cells.values() for c in row
                             for p, _ in [picks[id(c)]]])
            mean, low, high, _ = paired(cells, lambda c, picks=picks: picks[id(c)][0])
            summary[(m, steps, name)] = {"rows": rows, "agree": agree, "diff": mean, "low": low, "high": high}
            lines.append(f"| {name} | {', '.join(map(str, points))} | {m} -> {' -> '.join(map(str, counts))} | {rows:.3f} | "
                         f"{agree:.0%} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
        mean, low, high, _ = paired(cells, lambda c, m=m: best(c["oracle"], list(range(m))))
        lines.append(f"| control: the oracle's own pick (must win) | | | 1 | | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
        draws = {id(c): int(rng.integers(m)) for row in cells.values() for c in row}
        mean, low, high, _ = paired(cells, lambda c, draws=draws: draws[id(c)])
        lines.append(f"| control: a random candidate (no MI) | | | 1 / M | | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
        lines.append("")
    mio.write_json(args.traces.parent / "simulate.json", {f"M{m}-S{s}: {n}": v for (m, s, n), v in summary.items()})
    return "\n".join(lines)


def wall(args: argparse.Namespace) -> str:
    """Real rounds, timed per stage: full (writer thread off = before, on = after) and pruned."""
    pipe = load_pipeline(str(MODEL_DIR))
    prompts = load_toy("train", per_category=15).prompts
    lines = ["| M | prompts | run | UNet rows | idle rows | wall s | sample s | decode s | write s | pruned picks = replay |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, n in zip(args.m, args.wall_prompts):
        base = GenerationConfig(num_candidates=m, num_inference_steps=args.wall_steps, micro_batch=ROWS, seed=0)
        runs = [("full, writer off (before)", base, False)] if m == args.m[0] else []
        runs += [("full, writer on", base, True),
                 (f"pruned {list(map(list, RECOMMENDED))}, writer on", replace(base, prune=RECOMMENDED), True)]
        for name, config, overlap in runs:
            with tempfile.TemporaryDirectory() as tmp:
                timings: dict[str, float] = {}
                generate_round(pipe, prompts[:n], config, tmp, progress=False, overlap=overlap, timings=timings)
                select_round(tmp, n, config)
                check = ""
                cells = load_cells(args.traces, m, args.wall_steps).get(0, [])[:n]  # the traced prompts among these
                rows = [r for r in mio.read_jsonl(Path(tmp) / "metadata.jsonl") if r["prompt_id"] < len(cells)]
                if config.prune and cells:
                    picks = [r["candidate"] for r in finished(rows) if r["selected"]]
                    check = f"{sum(p == replay(c, RECOMMENDED)[0] for p, c in zip(picks, cells))}/{len(cells)}"
                elif cells and overlap:
                    # today's fixed micro-batches vs the continuous sampler's rows (the traces): same candidates?
                    mi = np.array([r["mi"] for r in rows])
                    traced = np.array([v for c in cells for v in c["mi"]])
                    differ = np.abs(mi - traced) / np.abs(traced)
                    check = f"MI = traced MI: {np.sum(differ == 0)}/{len(mi)} exactly, max rel. diff {differ.max():.1e}"
            lines.append(f"| {m} | {n} | {name} | {timings['unet_rows']:.0f} | {timings.get('idle_rows', 0):.0f} | "
                         f"{timings['wall']:.1f} | {timings['sample']:.1f} | {timings['decode']:.1f} | "
                         f"{timings['write']:.1f} | {check} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def rows(args: argparse.Namespace) -> str:
    """UNet rows of the recommended schedule against full sampling as a round grows: the tail's idle rows are
    a constant per round and rank, so their share falls with the round's size. Row counts depend on the
    schedule and the batch only, so the tiny random-init model (fast) stands in for the toy model."""
    from mitune.models.builders import build_tiny_pipeline

    lines = ["| M | prompts | UNet rows, full | UNet rows, pruned | of which idle | pruned / full |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(str(build_tiny_pipeline(Path(tmp) / "tiny", kind="sd")))
        for m in args.m:
            for n in args.rows_prompts:
                config = GenerationConfig(num_candidates=m, num_inference_steps=args.wall_steps, micro_batch=ROWS,
                                          seed=0, prune=RECOMMENDED)
                timings: dict[str, float] = {}
                generate_round(pipe, [f"a red cube number {i}" for i in range(n)], config, Path(tmp) / f"M{m}-{n}",
                               progress=False, timings=timings)
                full = 2 * n * m * args.wall_steps  # CFG: a conditional and an unconditional row per candidate and step
                lines.append(f"| {m} | {n} | {full} | {timings['unet_rows']:.0f} | {timings.get('idle_rows', 0):.0f} | "
                             f"{timings['unet_rows'] / full:.3f} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["trace", "simulate", "wall", "rows"])
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16, 50])
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--prompts", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--wall-prompts", type=int, nargs="+", default=[10, 5, 2])
    parser.add_argument("--wall-steps", type=int, default=25)
    parser.add_argument("--rows-prompts", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.stage == "trace":
        trace(args)
        return
    body = {"simulate": simulate, "wall": wall, "rows": rows}[args.stage](args)
    header = (f"<!-- python benchmarks/pruning.py {args.stage} ...: {time.perf_counter() - started:.0f} s on "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__} -->\n")
    if args.out:
        mio.write_text(args.out, header + body + "\n")
    print(body)


if __name__ == "__main__":
    main()
