"""The ``fedcoreml`` command: one entry point, subcommands contributed by each package.

Subcommands are registered under the ``fedcoreml.commands`` entry-point group (see
pyproject.toml). Each entry is a ``register(subparsers)`` function that adds its parser and sets
``handler``; a package's heavy imports happen inside its handler, so ``fedcoreml model ...`` or
the coordinator never load TensorFlow just to parse arguments.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from fedcoreml.ios_bridge.errors import FedCoreMLError

COMMAND_GROUP = "fedcoreml.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoreml",
        description="Federated learning for iPhones with updatable Core ML models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FedCoreMLError as exc:
        print(f"fedcoreml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedcoreml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
