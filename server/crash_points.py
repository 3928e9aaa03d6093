"""Fault injection for crash tests: SIGKILL the coordinator at a named point of a round.

Off unless the environment variable ``FEDCOREML_CRASH_AT`` is set, to ``POINT:ROUND``
(e.g. ``after-commit:2``); it is read here and nowhere else, once per process. When the
coordinator reaches that point for that round (a model version: round *r*'s aggregate is version
*r*; the last two points take the run's number of rounds), it logs one line and sends itself
SIGKILL, as ``kill -9`` or a power cut would: no handler, no flush, no cleanup. The points, in
the order a round passes them:

======================  ======================================================================
after-aggregate         the round's aggregate is baked into its .mlmodel; nothing of it is
                        written yet
after-model-file        ``models/round-NNNN.mlmodel`` is durable; its commit record is not
after-commit            the commit record is durable (``commits.jsonl``); no device has seen
                        the version yet
after-handout           the first task naming the version has been sent to a device
mid-judging             the held-out judging of the round's model has begun
before-metrics          judged; its ``metrics.jsonl`` line is not written
after-metrics           its ``metrics.jsonl`` line is durable
after-final             ``final.mlmodel`` is durable; no device has been told the run finished
after-run-finished      the first ``RunFinished`` has been sent to a device
======================  ======================================================================

``tests/test_crash_points.py`` kills a real coordinator at every one of them and resumes it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from dataclasses import dataclass

import grpc

from fedcoreml.ios_bridge.errors import FedCoreMLError

ENV = "FEDCOREML_CRASH_AT"
POINTS = (
    "after-aggregate",
    "after-model-file",
    "after-commit",
    "after-handout",
    "mid-judging",
    "before-metrics",
    "after-metrics",
    "after-final",
    "after-run-finished",
)

log = logging.getLogger("fedcoreml.coordinator")


class CrashPointError(FedCoreMLError):
    """A malformed ``FEDCOREML_CRASH_AT``."""


@dataclass(frozen=True)
class CrashAt:
    point: str
    round: int


def parse(text: str) -> CrashAt:
    """``POINT:ROUND`` as a CrashAt; CrashPointError naming what is wrong otherwise."""
    point, sep, number = text.strip().partition(":")
    if point not in POINTS or not sep or not number.isdigit():
        raise CrashPointError(
            f"{ENV}={text!r}: expected POINT:ROUND with ROUND a number and POINT one of "
            f"{', '.join(POINTS)}"
        )
    return CrashAt(point, int(number))


@functools.cache
def configured() -> CrashAt | None:
    """The crash point this process was started with, or None (the default: never crash)."""
    text = os.environ.get(ENV, "")
    return parse(text) if text.strip() else None


def reached(point: str, round_number: int) -> None:
    """Die here, at once, if this process was told to crash at ``point`` of ``round_number``."""
    assert point in POINTS, point
    at = configured()
    if at is None or (at.point, at.round) != (point, round_number):
        return
    log.warning("%s: crash point %s:%d reached; killing the coordinator", ENV, point,
                round_number)  # fmt: skip
    os.kill(os.getpid(), signal.SIGKILL)


def after_reply(context: grpc.ServicerContext, point: str, round_number: int) -> None:
    """Die at ``point`` once the reply of the call being served has been sent."""
    at = configured()
    if at is not None and (at.point, at.round) == (point, round_number):
        context.add_callback(lambda: reached(point, round_number))
