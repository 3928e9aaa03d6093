"""Stopping the coordinator cleanly on SIGTERM or Ctrl-C.

Inside :func:`stop_signals`, either signal raises :class:`StopRequested` in the main thread,
wherever it is waiting, so the caller can close the device port, let the round being judged be
recorded, and say where the run stopped. A second signal while that happens ends the process at
once, the default way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

# Exit statuses by the shell's convention: 128 + the signal's number.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StopRequested(BaseException):
    """A stop signal arrived. A BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.name = NAMES.get(signum, f"signal {signum}")
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise :class:`StopRequested` (main thread only)."""

    def stop(signum: int, _frame: object) -> None:
        for each in EXIT_CODES:
            signal.signal(each, signal.SIG_DFL)
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, stop) for signum in EXIT_CODES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
