"""The ``layerscope`` command line: the only module that prints besides the ``print_*`` helpers.

Exit codes: 0 success; 2 a usage error (bad arguments or values: unknown model, plan, GPU,
precision, optimizer, non-positive sizes); 1 a failure while doing the work (e.g. a file that
cannot be written), or, for ``estimate --fail-if-not-fits``, a run that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from layerscope.errors import LayerscopeError

USAGE, FAILURE = 2, 1


class UsageError(Exception):
    """A bad command-line value found after argparse (exit code 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _load(args: argparse.Namespace) -> Any:
    """The model skeleton for ``args.model`` (anything ``empty_model`` accepts)."""
    from layerscope.build import empty_model

    return empty_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


def _plan(args: argparse.Namespace) -> Any:
    from layerscope.plan import FreezePlan

    return FreezePlan.parse(args.plan) if getattr(args, "plan", None) else None


def cmd_presets(args: argparse.Namespace) -> int:
    from layerscope.catalog import presets

    names = presets()
    if args.json:
        print(json.dumps(names))
    else:
        print("\n".join(names))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from layerscope.layer_utils import model_summary

    print(model_summary(_load(args), max_depth=args.depth))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import warnings

    from layerscope.apply import apply_plan
    from layerscope.layer_utils import layer_status

    model = _load(args)
    plan = _plan(args)
    if plan is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_plan(model, plan)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    print(layer_status(model, show_all=args.all))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope",
        description="Pre-flight checks for fine-tuning: will it fit, what will it cost, "
        "which layers to freeze.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        return p

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL",
                       help="a preset (see `layerscope presets`), a config.json file or folder, "
                       "or a hub id already in the local cache")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow configs that need the model's own code")

    def add_plan(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plan", metavar="PLAN",
                       help="none, all, lp-lora[:RATIO], first:N, last:N, except-last:N, "
                       "embeddings, regex:PATTERN or a plan .json file; + combines")

    p = add("presets", cmd_presets, "list the built-in model presets")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = add("summary", cmd_summary, "the model's structure and parameter counts")
    add_model(p)
    p.add_argument("--depth", type=_non_negative_int, default=3, metavar="N",
                   help="module levels to show (default 3)")

    p = add("status", cmd_status, "which blocks a plan freezes")
    add_model(p)
    add_plan(p)
    p.add_argument("--all", action="store_true", help="one line per block")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LAYERSCOPE_DEBUG") == "1"
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `layerscope presets | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, LayerscopeError) as exc:
        if debug:
            traceback.print_exc()
        print(f"layerscope {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except Exception as exc:  # a failure while working: one line, traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"layerscope {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
