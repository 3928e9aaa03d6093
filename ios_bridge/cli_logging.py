"""Logging of the long-running commands (``server``, ``devices``, ``demo``): --log-level, -v, -q.

One plain line per event on stderr, ``time LEVEL logger: message``, without colour codes, so
that operators can grep and ship it. Flower's own console handler (coloured, another format) is
replaced by this one. A line identical to its logger's line just before it is printed once:
Flower says "Waiting for nodes to connect" every second while the coordinator waits for devices.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that follow --log-level; everything else (third-party libraries) logs warnings and up.
OWN_LOGGERS = ("fedcoreml", "flwr")


def add_logging_options(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """Add ``--log-level LEVEL`` and its shorthands ``-v`` (debug) and ``-q`` (errors only)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help=f"what to log on stderr: {', '.join(LOG_LEVELS)} (default {default})",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        help="log everything (same as --log-level debug)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="error",
        help="log errors only (same as --log-level error)",
    )


class RepeatFilter(logging.Filter):
    """Drop a record whose level and text are those of its logger's record just before it."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._last: dict[str, tuple[int, str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        said = (record.levelno, record.getMessage())
        with self._lock:
            repeated = self._last.get(record.name) == said
            self._last[record.name] = said
        return not repeated


class DefaultNoticeFilter(logging.Filter):
    """Drop Flower's warning that ``fraction_evaluate`` 0 skips federated evaluation.

    That is fedcoreml's default (devices evaluate only when ``--fraction-evaluate`` asks them
    to), so the warning would precede every run, and every refused option found after the
    strategy is built.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Federated evaluation will be skipped" not in record.getMessage()


def configure_logging(level: str, *, flower: bool = False) -> None:
    """Log at ``level`` (one of :data:`LOG_LEVELS`) to stderr; ``flower``: Flower's lines too."""
    numeric = logging.getLevelName(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RepeatFilter())
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)
    if flower:
        # Flower adds its console handler when its logger module is first imported.
        importlib.import_module("flwr.common.logger")
        flower_logger = logging.getLogger("flwr")
        for own in list(flower_logger.handlers):
            if isinstance(own, logging.StreamHandler):
                flower_logger.removeHandler(own)
        flower_logger.propagate = True
        if not any(isinstance(f, DefaultNoticeFilter) for f in flower_logger.filters):
            flower_logger.addFilter(DefaultNoticeFilter())
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
