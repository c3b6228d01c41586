"""``mitune export``, ``mitune merge`` and ``mitune rerank``: thin command-line wrappers over
``mitune.models.adapters`` and ``mitune.rerank``."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input on one line instead of usage plus error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mitune", description="Export and merge MI-TUNE adapters; MI best-of-N sampling.")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="save base + adapter as a plain diffusers pipeline dir")
    export.add_argument("--base", help="base model: local diffusers dir, hub id or 'toy' (default: the one the "
                                       "adapter records, its mitune_adapter.json's base_model)")
    export.add_argument("--adapter", required=True, help="adapter dir written by mitune")
    export.add_argument("--out", required=True, help="output pipeline dir")
    export.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep the adapter as a separate file")
    export.add_argument("--scale", type=float, default=1.0, help="adapter strength when fusing (default 1.0)")

    merge = commands.add_parser("merge", help="weighted mean of several adapters of the same base model")
    merge.add_argument("--adapters", nargs="+", required=True, help="adapter dirs")
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: equal)")
    merge.add_argument("--out", required=True, help="output adapter dir (refused if it holds an adapter)")
    merge.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")

    rerank = commands.add_parser("rerank", help="sample N candidates of a prompt and rank them by MI (best-of-N)")
    rerank.add_argument("--model", required=True, help="diffusers SD/SDXL pipeline: local dir, hub id, or 'toy'")
    rerank.add_argument("--prompt", required=True, help="the prompt")
    rerank.add_argument("-n", type=int, default=16, help="number of candidates (default 16)")
    rerank.add_argument("--out", required=True, help="output dir: every image, named by rank, and ranking.csv")
    rerank.add_argument("--score", choices=("mi", "phrase-mi"), default="mi",
                        help="rank by MI, or by the smallest per-phrase conditional MI (default mi)")
    rerank.add_argument("--phrase", action="append", dest="phrases",
                        help="a phrase of the prompt to score (repeat; default: its noun phrases); needs --score phrase-mi")
    rerank.add_argument("--steps", type=int, help="DDPM sampling steps (default: the paper's)")
    rerank.add_argument("--guidance", type=float, help="CFG scale (default: the paper's)")
    rerank.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    rerank.add_argument("--batch-size", type=int, default=8, help="candidates per UNet batch (default 8)")
    rerank.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the GPU if there is one)")
    rerank.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    return parser


def run_rerank(args: argparse.Namespace) -> str:
    """Check everything, then load the model, sample, rank and write; returns the table's path."""
    from diffusers.utils import logging as diffusers_logging

    from mitune.models.loading import load_pipeline
    from mitune.rerank import RerankConfig, check_out, check_request, rerank, write_ranking
    from mitune.runs import io as mio

    sampling = {"guidance_scale": args.guidance, "num_inference_steps": args.steps}
    config = RerankConfig(n=args.n, score=args.score, phrases=tuple(args.phrases) if args.phrases else None,
                          seed=args.seed, batch_size=args.batch_size,
                          **{key: value for key, value in sampling.items() if value is not None})
    check_request(args.prompt, config)
    check_out(args.out, args.prompt)
    out = mio.check_writable(args.out)
    diffusers_logging.disable_progress_bar()  # loading bars; rerank's own bar shows the sampling
    pipe = load_pipeline(args.model, torch_dtype=args.dtype, device=args.device)  # "toy": the shipped model
    return str(write_ranking(rerank(pipe, args.prompt, config), out, prompt=args.prompt))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help and usage errors answer without loading torch and diffusers.
    from mitune.runs.console import debugging, one_line, quiet_libraries

    quiet_libraries()
    from mitune.models.adapters import export_pipeline, merge_adapters

    try:
        if args.command == "rerank":
            out = run_rerank(args)
        elif args.command == "export":
            out = export_pipeline(args.base, args.adapter, args.out, fuse=args.fuse, scale=args.scale)
        else:
            weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
            out = merge_adapters(args.adapters, weights, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # bad paths, foreign adapters, bad weights: no traceback
        if debugging():
            raise
        print(f"mitune {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
