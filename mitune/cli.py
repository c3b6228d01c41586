"""``mitune export`` and ``mitune merge``: thin command-line wrappers over ``mitune.adapters``."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input on one line instead of usage plus error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mitune", description="Export and merge MI-TUNE adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="save base + adapter as a plain diffusers pipeline dir")
    export.add_argument("--base", required=True, help="base model: local diffusers dir or hub id")
    export.add_argument("--adapter", required=True, help="adapter dir written by mitune")
    export.add_argument("--out", required=True, help="output pipeline dir")
    export.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep the adapter as a separate file")
    export.add_argument("--scale", type=float, default=1.0, help="adapter strength when fusing (default 1.0)")

    merge = commands.add_parser("merge", help="weighted mean of several adapters of the same base model")
    merge.add_argument("--adapters", nargs="+", required=True, help="adapter dirs")
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: equal)")
    merge.add_argument("--out", required=True, help="output adapter dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help and usage errors answer without loading torch and diffusers.
    from mitune.adapters import export_pipeline, merge_adapters

    try:
        if args.command == "export":
            out = export_pipeline(args.base, args.adapter, args.out, fuse=args.fuse, scale=args.scale)
        else:
            weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
            out = merge_adapters(args.adapters, weights, args.out)
    except (ValueError, OSError) as err:  # bad paths, foreign adapters, bad weights: no traceback
        message = " ".join(str(err).split())  # one line even when a library's message has several
        print(f"mitune {args.command}: error: {message}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
