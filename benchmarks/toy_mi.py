"""MI best-of-N and neglect detection on the toy world (docs/mi/toy.md).

For every held-out toy prompt (``load_toy("val", per_category)``, as ``make toy-eval``), the
committed toy base model samples N candidates (25 DDPM steps, CFG 7.5, the paper's MI) with
plain and per-phrase MI fused into sampling (``mitune.rerank``); the exact oracle scores each
image, and for each phrase (one object with its attributes) says whether an object with all of
them was drawn. From these rows:

* best-of-N: the oracle score of the candidate picked by MI, by phrase MI (the minimum over
  phrases), by chance (the mean over all candidates) and by the oracle, for N in {4, 16}
  (best-of-4 ranks the first 4 of the 16; every candidate has its own seed);
* neglect: ROC AUC of a phrase's conditional MI (and, for comparison, of the image's plain MI)
  as a predictor of the oracle finding that phrase's object, per category and overall.

Rows are written per prompt and reused, so a rerun resumes.

    python benchmarks/toy_mi.py [--per-category 4] [--n 16] [--out docs/mi] [--work outputs/toy_mi]
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from mitune.models.loading import load_pipeline
from mitune.rerank import RerankConfig, rerank
from mitune.runs import io as mio
from mitune.toy.base_model import MODEL_DIR
from mitune.toy.oracle import detect, phrase_score, pixels, score_image
from mitune.toy.prompts import load_toy
from mitune.toy.world import CATEGORIES, Scene, category_of, parse
from mitune.toy.world import prompt as scene_prompt

NS = (4, 16)
TOY_TABLE = Path(__file__).resolve().parents[1] / "docs" / "toy" / "r3-30prompts" / "table1.csv"


def object_phrases(text: str) -> list[tuple[str, object]]:
    """(phrase, object) of each object the prompt names: "a red square" for Obj(square, red)."""
    return [(scene_prompt(Scene((obj,))), obj) for obj in parse(text).objects]


def prompt_rows(pipe, text: str, config: RerankConfig) -> list[dict]:
    """One row per candidate: MI, phrase MI, oracle score and which phrases the oracle found."""
    phrases = object_phrases(text)
    candidates = rerank(pipe, text, RerankConfig(**{**config.__dict__, "phrases": tuple(p for p, _ in phrases)}),
                        progress=False)
    rows = []
    for cand in sorted(candidates, key=lambda c: c.index):
        found = detect(pixels(cand.image))
        rows.append({
            "prompt": text, "category": category_of(text), "candidate": cand.index, "mi": cand.mi,
            "oracle": score_image(text, cand.image),
            "phrases": [{"phrase": p, "phrase_mi": cand.phrase_mi[p],
                         "found": any(phrase_score(obj, d) == 1.0 for d in found)} for p, obj in phrases],
        })
    return rows


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half): the Mann-Whitney AUC."""
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def picks(rows: list[dict], n: int, key) -> np.ndarray:
    """Per prompt, the oracle score of the first-n candidate that ``key`` ranks highest (ties to
    the lower candidate index); ``key=None`` is a random pick's expected score (the mean)."""
    out = []
    for text in dict.fromkeys(r["prompt"] for r in rows):
        pool = [r for r in rows if r["prompt"] == text and r["candidate"] < n]
        if key is None:
            out.append(np.mean([r["oracle"] for r in pool]))
        else:
            out.append(max(pool, key=lambda r: (key(r), -r["candidate"]))["oracle"])
    return np.array(out)


def best_of_n(rows: list[dict], n: int, key) -> float:
    """Mean over prompts of ``picks``."""
    return float(picks(rows, n, key).mean())


def min_phrase_mi(row: dict) -> float:
    return min(p["phrase_mi"] for p in row["phrases"])


def fine_tuned_rows(cfg: float) -> list[str]:
    """The earlier toy benchmark's base and MI-TUNE models on the same prompts (docs/toy/r3-30prompts/table1.csv,
    mean ± std over seeds)."""
    if not TOY_TABLE.exists():
        return []
    found = {(r["method"], r["round"]): r for r in csv.DictReader(TOY_TABLE.open()) if float(r["cfg"]) == cfg}
    out = []
    for (method, r), name in {("base", "0"): "base model, one sample", ("mi", "1"): "MI-TUNE round 1, one sample",
                              ("mi", "2"): "MI-TUNE round 2, one sample"}.items():
        if (method, r) in found:
            row = found[(method, r)]
            value = f"{float(row['all']):.3f} ± {float(row['all_std']):.3f}"
            out.append(f"| {name} (docs/toy/r3-30prompts, seeds' mean ± std) | {value} | {value} |")
    return out


def best_of_n_table(rows: list[dict], cfg: float) -> str:
    rules = {
        "random pick (mean of all candidates)": None,
        "MI": lambda r: r["mi"],
        "phrase MI (min over phrases)": min_phrase_mi,
        "oracle (upper bound)": lambda r: r["oracle"],
    }
    lines = ["| pick | " + " | ".join(f"N={n}" for n in NS) + " |", "|---|" + "---|" * len(NS)]
    for name, key in rules.items():
        lines.append(f"| {name} | " + " | ".join(f"{best_of_n(rows, n, key):.3f}" for n in NS) + " |")
    lines += fine_tuned_rows(cfg)
    lines += ["", "Paired differences over prompts (mean ± standard error):", "",
              "| difference | " + " | ".join(f"N={n}" for n in NS) + " |", "|---|" + "---|" * len(NS)]
    pairs = {"MI - random": ("MI", "random pick (mean of all candidates)"),
             "phrase MI - random": ("phrase MI (min over phrases)", "random pick (mean of all candidates)"),
             "phrase MI - MI": ("phrase MI (min over phrases)", "MI")}
    for name, (a, b) in pairs.items():
        cells = []
        for n in NS:
            diff = picks(rows, n, rules[a]) - picks(rows, n, rules[b])
            cells.append(f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def within_phrase_auc(rows: list[dict], key: str) -> tuple[float, int]:
    """Mean AUC over (prompt, phrase) pairs, each across that prompt's images (pairs where the
    object is found in some images and missed in others), and the number of such pairs: how
    well the score ranks one prompt's candidates, as selection uses it."""
    aucs = []
    for text in dict.fromkeys(r["prompt"] for r in rows):
        mine = [r for r in rows if r["prompt"] == text]
        for k in range(len(mine[0]["phrases"])):
            found = np.array([r["phrases"][k]["found"] for r in mine])
            scores = np.array([r["phrases"][k]["phrase_mi"] if key == "phrase_mi" else r["mi"] for r in mine])
            if 0 < found.sum() < len(found):
                aucs.append(roc_auc(scores, found))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def auc_table(rows: list[dict]) -> str:
    lines = ["| category | phrases | found | AUC phrase MI | AUC plain MI | within-prompt AUC phrase MI | "
             "within-prompt AUC plain MI | (prompt, phrase) pairs |", "|---|---|---|---|---|---|---|---|"]
    for category in (*CATEGORIES, "all"):
        mine = [r for r in rows if category in ("all", r["category"])]
        items = [(p["phrase_mi"], r["mi"], p["found"]) for r in mine for p in r["phrases"]]
        phrase, plain, found = (np.array(x) for x in zip(*items))
        found = found.astype(bool)
        (within_phrase, pairs), (within_plain, _) = within_phrase_auc(mine, "phrase_mi"), within_phrase_auc(mine, "mi")
        lines.append(f"| {category} | {len(found)} | {found.mean():.2f} | {roc_auc(phrase, found):.3f} | "
                     f"{roc_auc(plain, found):.3f} | {within_phrase:.3f} | {within_plain:.3f} | {pairs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--n", type=int, default=max(NS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=Path("docs/mi"))
    parser.add_argument("--work", type=Path, default=Path("outputs/toy_mi"))
    args = parser.parse_args(argv)
    config = RerankConfig(n=args.n, score="phrase-mi", guidance_scale=args.guidance, num_inference_steps=args.steps,
                          batch_size=args.n)
    prompts = load_toy("val", args.per_category).prompts
    pipe = load_pipeline(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, text in enumerate(tqdm(prompts, desc="toy prompts", unit="prompt")):
        part = mio.check_writable(args.work) / f"{i:03d}.json"
        if not part.exists():
            mio.write_json(part, {"prompt": text, "rows": prompt_rows(pipe, text, config)})
        rows += json.loads(part.read_text())["rows"]
    command = "python benchmarks/toy_mi.py " + shlex.join(sys.argv[1:])
    report = (
        "# MI best-of-N and neglect detection on the toy world\n\n"
        f"`{command.strip()}`: {len(prompts)} held-out toy prompts ({args.per_category} per category), "
        f"N = {args.n} candidates each from the toy base model, {args.steps} DDPM steps, CFG {args.guidance}, "
        "the paper's MI (fused, sum over steps) and per-phrase conditional MI (fused, rest prompt = the prompt "
        "without the phrase); oracle score in [0, 1].\n\n"
        "## Best-of-N: oracle score of the picked image (mean over prompts)\n\n"
        f"{best_of_n_table(rows, args.guidance)}\n\n"
        "## Neglect: does a phrase's conditional MI predict that the oracle finds its object?\n\n"
        "One row per (image, phrase); found = an object with all of the phrase's attributes was drawn. "
        "AUC 0.5 is chance; plain MI (the same for every phrase of an image) is the baseline. The pooled AUC "
        "compares phrases of different prompts; the within-prompt AUC ranks one prompt's candidates (as "
        "selection does), averaged over the (prompt, phrase) pairs found in some images and missed in others.\n\n"
        f"{auc_table(rows)}\n"
    )
    mio.write_text(mio.check_writable(args.out) / "toy.md", report)
    mio.write_jsonl(args.out / "toy_rows.jsonl", rows)
    print(report)


if __name__ == "__main__":
    main()
