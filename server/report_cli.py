"""``fedcoreml report RUN_DIR``: a self-contained HTML report of a run, and its plots as PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="write an HTML report (and PNG plots) of a run directory",
        description=(
            "Read a run directory, finished or still running, and write one self-contained "
            "HTML page: test accuracy and loss, devices and time per round (plots embedded), "
            "every committed model with its sha256 and size, and the run's configuration. "
            'Needs the report extra: pip install "fedcoreml[report]".'
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory")
    report.add_argument(
        "--out", type=Path, default=Path("report.html"), help="the HTML file (default: %(default)s)"
    )
    report.add_argument(
        "--png", type=Path, metavar="DIR", help="also write each plot to DIR/NAME.png"
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedcoreml.server.report import write_report

    files = write_report(args.run_dir, args.out, args.png)
    view = files.view
    judged = len(view.metrics)
    Console(soft_wrap=True).print(
        f"Wrote {files.html} ({view.state}; {len(view.models)} models committed, {judged} judged)"
    )
    for path in files.pngs:
        print(path)
    return 0
