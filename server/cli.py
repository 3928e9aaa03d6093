"""The ``fedcoreml`` command: one entry point, subcommands contributed by each package.

Subcommands are registered under the ``fedcoreml.commands`` entry-point group (see
pyproject.toml). Each entry is a ``register(subparsers)`` function that adds its parser and sets
``handler``; a package's heavy imports happen inside its handler, so ``fedcoreml model ...`` or
the coordinator never load TensorFlow just to parse arguments.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

from fedcoreml.ios_bridge.errors import FedCoreMLError

COMMAND_GROUP = "fedcoreml.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoreml",
        description="Federated learning for iPhones with updatable Core ML models.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def _version() -> str:
    try:
        return version("fedcoreml")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "(not installed)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FedCoreMLError as exc:  # bad input: the message says what and where
        print(f"fedcoreml {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused: a file that cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        print(f"fedcoreml {args.command}: error: {where}{_one_line(reason)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedcoreml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
