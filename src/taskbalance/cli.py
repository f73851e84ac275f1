"""The ``taskbalance`` command: ``taskbalance quickstart``, ``taskbalance methods``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from taskbalance.methods.registry import hyperparameters, list_methods, method_class


def _methods(_: argparse.Namespace) -> None:
    rows = [("name", "needs", "levels (default first)", "hyperparameters", "paper")]
    for name in list_methods():
        cls = method_class(name)
        options = ", ".join(
            f"{key}={value!r}"
            for key, value in hyperparameters(name).items()
            if key not in ("tasks", "level")
        )
        levels = sorted(cls.levels, key=lambda level: level != cls.default_level)
        rows.append((name, cls.requires.value, "/".join(levels) or "-", options or "-", cls.paper))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]))


def _quickstart(args: argparse.Namespace) -> None:
    from taskbalance.bench.quickstart import run

    for method in args.methods:
        print(f"\n== {method} ==")
        run(method, steps=args.steps, every=args.every, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``taskbalance`` command."""
    parser = argparse.ArgumentParser(
        prog="taskbalance", description="Multi-task optimisation for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("methods", help="list the methods with level, needs, paper")
    listing.set_defaults(run=_methods)
    quick = commands.add_parser(
        "quickstart",
        help="train a small multi-task model on real data (Linnerud) and print losses, weights",
    )
    quick.add_argument(
        "--methods",
        nargs="+",
        default=["ew", "imtl"],
        choices=list_methods(),
        metavar="NAME",
        help="methods to train one after the other (default: ew imtl); any name that "
        "'taskbalance methods' lists",
    )
    quick.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    quick.add_argument("--every", type=int, default=100, help="print every N steps (default 100)")
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskbalance`` command."""
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
