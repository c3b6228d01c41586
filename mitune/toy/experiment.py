"""The toy-world experiment (``make toy-eval``): is MI a better selector than chance?

For every seed and selection strategy (``mi`` = MI-TUNE, ``random``, ``oracle`` = upper
bound), ``python -m mitune.run +experiment=toy`` trains R rounds on the toy train prompts.
The base model (round 0) and every round's adapter then generate images for the held-out
test prompts at each CFG, and the exact oracle scores them. Kendall's tau between MI and
the oracle over each prompt's round-1 candidates tests MI as an alignment score (paper §3.1).

Every stage writes atomically and is skipped when already done, so a rerun resumes.
Outputs: per-image scores (``scores.csv``), the summary over seeds (``summary.csv``,
``results.md``) and plots, in ``--out`` and copied to ``--docs``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mitune.adapters import load_fused  # noqa: E402
from mitune.analysis import PAPER_RANKS, by_prompt, kendall_by_rank, scale_ranks  # noqa: E402
from mitune.evaluate import rounds_trained  # noqa: E402
from mitune.generation import GenerationConfig, run_round  # noqa: E402
from mitune.io import atomic_write, read_jsonl, write_text  # noqa: E402
from mitune.models import load_pipeline  # noqa: E402
from mitune.prompts import load_toy  # noqa: E402
from mitune.selection import STRATEGIES  # noqa: E402
from mitune.summary import csv_text  # noqa: E402
from mitune.toy.base_model import MODEL_DIR  # noqa: E402
from mitune.toy.oracle import detect, score, score_image  # noqa: E402
from mitune.toy.world import CATEGORIES, category_of, parse  # noqa: E402
from mitune.tracking import setup_wandb  # noqa: E402

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SCORE_COLUMNS = ["method", "seed", "round", "cfg", "category", "prompt", "candidate", "mi", "oracle"]


@dataclass(frozen=True)
class ToyEval:
    """What ``make toy-eval`` runs; the defaults take ~45 min on 2 CPU cores."""

    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = ("mi", "random", "oracle")  # phrase_mi on request (--strategies)
    rounds: int = 3
    cfgs: tuple[float, ...] = (3.0, 7.5)
    test_per_category: int = 4
    images_per_prompt: int = 3
    steps: int = 25
    model: Path = MODEL_DIR
    overrides: tuple[str, ...] = ()
    """Extra ``mitune.run`` overrides for every training run (e.g. fewer steps for a smoke run)."""

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be a non-empty subset of {STRATEGIES}, got {self.strategies}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {self.seeds}")
        if self.rounds < 1 or self.images_per_prompt < 1 or self.test_per_category < 1:
            raise ValueError("rounds, images_per_prompt and test_per_category must be >= 1")
        if any(not np.isfinite(c) or c < 0 for c in self.cfgs) or not self.cfgs:
            raise ValueError(f"cfgs must be finite and >= 0, got {self.cfgs}")
        if not (Path(self.model) / "model_index.json").is_file():
            raise FileNotFoundError(f"toy model {self.model} not found; run `make toy-model`")

    def run_dir(self, strategy: str, seed: int) -> Path:
        return self.out / "runs" / f"{strategy}-seed{seed}"


# ----------------------------------------------------------------------------- training


def train(config: ToyEval, strategy: str, seed: int) -> Path:
    """One MI-TUNE run through the real entry point; a rerun resumes it from its checkpoint."""
    run_dir = config.run_dir(strategy, seed)
    if (rounds_trained(run_dir) or 0) >= config.rounds:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mitune.run", "+experiment=toy", f"generation.selection={strategy}",
               f"seed={seed}", f"rounds={config.rounds}", f"model.path_or_id={config.model}",
               f"hydra.run.dir={run_dir}", "resume=true", f"task_name=toy-{strategy}",
               "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", *config.overrides]
    log.info("training %s", " ".join(command[1:]))
    with open(run_dir / "train.log", "a") as logfile:
        result = subprocess.run(command, cwd=REPO, stdout=logfile, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"training {strategy} seed {seed} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    return run_dir


# ----------------------------------------------------------------------------- evaluation


def eval_dir(config: ToyEval, method: str, seed: int, r: int, cfg: float) -> Path:
    name = "base" if r == 0 else method
    return config.out / "eval" / f"{name}-seed{seed}" / f"round{r}" / f"cfg{cfg:g}"


def evaluate(config: ToyEval, method: str, seed: int, r: int, prompts: list[str]) -> list[dict]:
    """Generate and oracle-score the test prompts with round r's model at every CFG."""
    dirs = {cfg: eval_dir(config, method, seed, r, cfg) for cfg in config.cfgs}
    if not all((d / "metadata.jsonl").is_file() for d in dirs.values()):
        pipe = load_pipeline(str(config.model))
        if r > 0:
            load_fused(pipe, config.run_dir(method, seed) / "rounds" / f"round_{r}" / "adapter")
        pipe.unet.eval()
        for cfg, out in dirs.items():
            generation = GenerationConfig(num_candidates=config.images_per_prompt, guidance_scale=cfg,
                                          num_inference_steps=config.steps, micro_batch=32, seed=10_000 + seed)
            run_round(pipe, prompts, generation, out, progress=False)
    rows = []
    for cfg, out in dirs.items():
        for row in read_jsonl(out / "metadata.jsonl"):
            rows.append({"method": "base" if r == 0 else method, "seed": seed, "round": r, "cfg": cfg,
                         "category": category_of(row["prompt"]), "prompt": row["prompt"],
                         "candidate": row["candidate"], "mi": row["mi"], "oracle": oracle(out, row)})
    return rows


def oracle(folder: Path, row: dict) -> float:
    """The oracle score of a generated image, as ``toy_oracle`` in ``mitune.evaluate`` would give it."""
    with Image.open(folder / row["file_name"]) as image:
        return score_image(row["prompt"], image)


# ----------------------------------------------------------------------------- analysis


def summarise(rows: list[dict]) -> list[dict]:
    """Mean oracle score per (method, round, cfg, category) and overall: mean and std over seeds."""
    table: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        for category in (row["category"], "all"):
            key = (row["method"], row["round"], row["cfg"], category)
            table.setdefault(key, {}).setdefault(row["seed"], []).append(row["oracle"])
    out = []
    for (method, r, cfg, category), per_seed in sorted(table.items(), key=lambda kv: _order(kv[0])):
        means = np.array([np.mean(v) for v in per_seed.values()])
        out.append({"method": method, "round": r, "cfg": cfg, "category": category, "mean": float(means.mean()),
                    "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0, "seeds": len(means),
                    "n": sum(len(v) for v in per_seed.values())})
    return out


def _order(key: tuple) -> tuple:
    method, r, cfg, category = key
    methods = ("base", *STRATEGIES)
    categories = (*CATEGORIES, "all")
    return methods.index(method), r, cfg, categories.index(category)


def candidate_scores(round_dir: Path) -> list[dict]:
    """A training round's candidates with their MI, oracle score, selection and object count."""
    rows = []
    for row in read_jsonl(round_dir / "metadata.jsonl"):
        image = np.asarray(Image.open(round_dir / row["file_name"]).convert("RGB"))
        objects = len(detect(image))
        rows.append({**row, "oracle": score(row["prompt"], image), "objects": objects,
                     "count_ok": objects == len(parse(row["prompt"]).objects)})
    return rows


def round_stats(config: ToyEval) -> list[dict]:
    """Every training round's candidates (train prompts): what the strategy selected vs the whole
    pool, and how MI ranks relate to the oracle score and to the number of objects drawn. In
    round 1 all strategies share the base model's candidates; at the paper's MI ranks (1st/25th/
    50th of 50, scaled to M) the oracle score is reported too (paper §3.1)."""
    stats = []
    for strategy in config.strategies:
        for seed in config.seeds:
            for r in range(1, config.rounds + 1):
                rows = candidate_scores(config.run_dir(strategy, seed) / "rounds" / f"round_{r}")
                oracle_scores = [row["oracle"] for row in rows]
                m = sum(row["prompt"] == rows[0]["prompt"] for row in rows)
                paper_ranks = scale_ranks(PAPER_RANKS, m)
                by_mi_rank = by_prompt(rows, oracle_scores, paper_ranks)
                chosen = [row for row in rows if row["selected"]]
                stats.append({
                    "strategy": strategy, "seed": seed, "round": r,
                    "selected": np.mean([row["oracle"] for row in chosen]), "all": np.mean(oracle_scores),
                    **{f"mi_rank_{k}": np.mean([found[k][1] for found in by_mi_rank.values()]) for k in paper_ranks},
                    "tau_mi_oracle": kendall_by_rank(rows, oracle_scores, range(1, m + 1), "oracle").mean_tau,
                    "tau_mi_oracle_paper_ranks": kendall_by_rank(rows, oracle_scores, paper_ranks, "oracle").mean_tau,
                    "tau_mi_objects": kendall_by_rank(rows, [row["objects"] for row in rows], range(1, m + 1)).mean_tau,
                    "count_ok_selected": np.mean([row["count_ok"] for row in chosen]),
                    "count_ok_all": np.mean([row["count_ok"] for row in rows]),
                })
    return stats


# ----------------------------------------------------------------------------- reporting


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows under the first row's keys, in the same CSV dialect as every other table mitune writes."""
    write_text(path, csv_text(rows, list(rows[0])))


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def markdown(config: ToyEval, summary: list[dict], selection: list[dict]) -> str:
    lines = [f"# Toy-world results ({len(config.seeds)} seeds: mean ± std over seeds)", "",
             "Generated by `python -m mitune.toy.experiment` (`make toy-eval`): held-out val prompts, "
             f"{config.test_per_category} per category, {config.images_per_prompt} images each, "
             f"{config.steps} DDPM steps; oracle score in [0, 1].", ""]
    for cfg in config.cfgs:
        lines += [f"## Oracle alignment at CFG {cfg:g}", "",
                  "| method | round | " + " | ".join(CATEGORIES) + " | all |",
                  "|---|---|" + "---|" * (len(CATEGORIES) + 1)]
        for key in dict.fromkeys((s["method"], s["round"]) for s in summary if s["cfg"] == cfg):
            cells = {s["category"]: _fmt(s["mean"], s["std"]) for s in summary if (s["method"], s["round"], s["cfg"]) == (*key, cfg)}
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells[c] for c in (*CATEGORIES, "all")) + " |")
        lines.append("")
    first = [row for row in selection if row["round"] == 1]
    ranks = [k for k in first[0] if k.startswith("mi_rank_")]
    lines += ["## Round 1 on the train prompts: the base model's candidates", "",
              "Oracle score of the candidates each strategy selected vs all candidates, and of the candidates "
              "at MI rank k (1 = highest MI; the paper's 1st/25th/50th of 50 scaled to M). Kendall tau (mean "
              "over prompts) between MI and the oracle score over all M candidates and over those ranks, and "
              "between MI and the number of objects drawn; share of images with as many objects as the prompt "
              "names, selected vs all.", "",
              "| strategy | selected | all | " + " | ".join(f"MI rank {k.rsplit('_', 1)[1]}" for k in ranks)
              + " | tau(MI, oracle) | tau, paper ranks | tau(MI, #objects) | right #objects: selected | all |",
              "|---|" + "---|" * (7 + len(ranks))]
    cols = ["selected", "all", *ranks, "tau_mi_oracle", "tau_mi_oracle_paper_ranks", "tau_mi_objects",
            "count_ok_selected", "count_ok_all"]
    for strategy in config.strategies:
        mine = [row for row in first if row["strategy"] == strategy]
        lines.append(f"| {strategy} | " + " | ".join(_fmt(*_mean_std([row[c] for row in mine])) for c in cols) + " |")
    lines += ["", "## Training pools by round (train prompts, all M candidates, generated by the model after "
              "round r-1)", "", "| strategy | " + " | ".join(f"round {r}" for r in range(1, config.rounds + 1))
              + " |", "|---|" + "---|" * config.rounds]
    for strategy in config.strategies:
        cells = [_fmt(*_mean_std([row["all"] for row in selection if (row["strategy"], row["round"]) == (strategy, r)]))
                 for r in range(1, config.rounds + 1)]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def plot_rounds(config: ToyEval, summary: list[dict], path: Path) -> None:
    """Overall oracle score vs round, one line per strategy, one panel per CFG."""
    fig, axes = plt.subplots(1, len(config.cfgs), figsize=(4.5 * len(config.cfgs), 3.5), sharey=True, squeeze=False)
    for ax, cfg in zip(axes[0], config.cfgs):
        base = next(s for s in summary if (s["method"], s["cfg"], s["category"]) == ("base", cfg, "all"))
        for strategy in config.strategies:
            points = [base] + [s for s in summary if (s["method"], s["cfg"], s["category"]) == (strategy, cfg, "all")]
            ax.errorbar([p["round"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                        marker="o", capsize=3, label=strategy)
        ax.set(title=f"CFG {cfg:g}", xlabel="round R (0 = base)", xticks=range(config.rounds + 1))
    axes[0][0].set_ylabel("oracle alignment (test prompts)")
    axes[0][-1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_categories(config: ToyEval, summary: list[dict], path: Path) -> None:
    """Per-category oracle score after the last round at the highest CFG, base vs strategies."""
    cfg, r = max(config.cfgs), config.rounds
    methods = [("base", 0)] + [(s, r) for s in config.strategies]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for i, (method, rr) in enumerate(methods):
        cells = {s["category"]: s for s in summary if (s["method"], s["round"], s["cfg"]) == (method, rr, cfg)}
        xs = np.arange(len(CATEGORIES) + 1) + i * width
        cats = (*CATEGORIES, "all")
        ax.bar(xs, [cells[c]["mean"] for c in cats], width, yerr=[cells[c]["std"] for c in cats], capsize=2,
               label=f"{method}" + (f" R={rr}" if rr else ""))
    ax.set(xticks=np.arange(len(CATEGORIES) + 1) + 0.4 - width / 2, xticklabels=(*CATEGORIES, "all"),
           ylabel="oracle alignment", title=f"test prompts, CFG {cfg:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def log_wandb(config: ToyEval, summary: list[dict], files: list[Path]) -> None:
    """The summary table and plots as one W&B run (offline without credentials)."""
    import wandb

    setup_wandb()
    run = wandb.init(project="mitune", name="toy-eval", dir=str(config.out), config={"seeds": list(config.seeds)})
    try:
        run.log({"toy/summary": wandb.Table(columns=list(summary[0]), data=[list(s.values()) for s in summary]),
                 **{f"toy/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}})
    finally:
        wandb.finish()


# ----------------------------------------------------------------------------- main


def run(config: ToyEval, docs: Path | None = None) -> list[dict]:
    test_prompts = load_toy("val", config.test_per_category).prompts
    for seed in config.seeds:
        for strategy in config.strategies:
            train(config, strategy, seed)
    rows = []
    jobs = [("base", seed, 0) for seed in config.seeds] + [
        (s, seed, r) for s in config.strategies for seed in config.seeds for r in range(1, config.rounds + 1)]
    for i, (method, seed, r) in enumerate(jobs, 1):
        log.info("evaluating %s seed %d round %d (%d/%d)", method, seed, r, i, len(jobs))
        rows += evaluate(config, method, seed, r, test_prompts)
    summary = summarise(rows)
    selection = round_stats(config)
    files = [config.out / name for name in ("scores.csv", "summary.csv", "rounds.csv", "results.md", "rounds.png",
                                            "categories.png")]
    write_csv(files[0], rows)
    write_csv(files[1], summary)
    write_csv(files[2], selection)
    write_text(files[3], markdown(config, summary, selection))
    plot_rounds(config, summary, files[4])
    plot_categories(config, summary, files[5])
    log_wandb(config, summary, files)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in files[1:]:
            shutil.copyfile(f, docs / f.name)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/toy-eval"))
    parser.add_argument("--docs", type=Path, default=None, help="also copy the tables and plots here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(ToyEval.strategies), choices=STRATEGIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cfgs", type=float, nargs="+", default=[3.0, 7.5])
    parser.add_argument("--test-per-category", type=int, default=4)
    parser.add_argument("--images-per-prompt", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("overrides", nargs="*",
                        help="extra mitune.run overrides for the training runs, before the options (e.g. train.lr=1e-4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    docs = args.docs
    config = ToyEval(out=args.out, seeds=tuple(args.seeds), strategies=tuple(args.strategies), rounds=args.rounds,
                     cfgs=tuple(args.cfgs), test_per_category=args.test_per_category,
                     images_per_prompt=args.images_per_prompt, steps=args.steps, model=args.model,
                     overrides=tuple(args.overrides))
    run(config, docs)
    print(f"toy-eval: results in {config.out / 'results.md'}" + (f", copied to {docs}" if docs else ""))


if __name__ == "__main__":
    main()
