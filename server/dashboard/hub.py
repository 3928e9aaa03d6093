"""Live updates for every open page: one reader of the run and the fleet, fanned out to streams.

One task on the dashboard's event loop polls the run directory (:class:`RunFeed`) and, while
any event stream is open, the fleet; the reads run on worker threads, never on the loop. Each
result is serialised once into an immutable :class:`Snapshot`, and every stream (see
:func:`event_stream`) writes from that snapshot what its page has not seen yet. So 50 open pages
cost one read, not 50, and a slow browser only ever holds up its own stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio.to_thread

from fedcoreml.server.dashboard.fleet import FleetSource, fleet_snapshot
from fedcoreml.server.dashboard.run_feed import RunFeed

__all__ = ["KEEPALIVE_S", "Hub", "Snapshot", "event_stream", "fleet_summary"]

log = logging.getLogger("fedcoreml.dashboard")

#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class Snapshot:
    """What the pages are shown, serialised: the run, its judged rounds, the fleet's counts."""

    run_version: int = 0
    run: str = "{}"
    rounds: tuple[str, ...] = ()  # one JSON object per judged round, in order
    fleet_version: int = 0
    fleet: str | None = None  # None: no live coordinator behind this dashboard


def fleet_summary(fleet: dict[str, Any]) -> dict[str, Any]:
    """The fleet's counts without the device list (which only the Fleet page fetches)."""
    return {key: value for key, value in fleet.items() if key != "devices"}


class Hub:
    """The shared snapshot and the wake-up for streams; lives on the dashboard's event loop."""

    def __init__(
        self,
        feed: RunFeed,
        fleet: FleetSource | None,
        poll_s: float = 0.25,
        fleet_every_s: float = 2.0,
    ) -> None:
        self.feed = feed
        self.fleet = fleet
        self.poll_s = poll_s
        self.fleet_every_s = fleet_every_s
        self.snapshot = Snapshot()
        self.streams = 0
        self.closing = False
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:  # created on the loop that uses it
            self._changed = asyncio.Event()
        return self._changed

    def publish(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` current and wake every stream."""
        self.snapshot = snapshot
        event, self._changed = self._event(), asyncio.Event()
        event.set()

    async def changed(self, timeout_s: float) -> bool:
        """Wait for the next publish (True) or ``timeout_s`` (False)."""
        event = self._event()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """End every stream (the dashboard is stopping); call it on the hub's loop."""
        self.closing = True
        self.publish(self.snapshot)

    def close_from_thread(self) -> None:
        """:meth:`close`, from any thread: streams end before the server stops waiting on them."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.closing = True
            return
        try:
            loop.call_soon_threadsafe(self.close)
        except RuntimeError:  # the loop closed meanwhile
            self.closing = True

    async def refresh(self, with_fleet: bool) -> None:
        """Read what changed (off the loop) and publish it."""
        snapshot = self.snapshot
        if await anyio.to_thread.run_sync(self.feed.refresh):
            run, rounds = self.feed.run_json(), self.feed.rounds_json()
            snapshot = replace(
                snapshot,
                run_version=snapshot.run_version + 1,
                run=json.dumps(run),
                rounds=tuple(json.dumps(line) for line in rounds),
            )
        if with_fleet and self.fleet is not None:
            fleet = await anyio.to_thread.run_sync(fleet_snapshot, self.fleet)
            text = json.dumps(fleet_summary(fleet))
            if text != snapshot.fleet:
                snapshot = replace(snapshot, fleet_version=snapshot.fleet_version + 1, fleet=text)
        if snapshot is not self.snapshot:
            self.publish(snapshot)

    async def run(self) -> None:
        """Poll until cancelled: the run every ``poll_s``, the fleet every ``fleet_every_s``
        while a stream is open."""
        loop = self._loop = asyncio.get_running_loop()
        next_fleet = 0.0
        failure: str | None = None
        while not self.closing:
            now = loop.time()
            with_fleet = self.streams > 0 and now >= next_fleet
            if with_fleet:
                next_fleet = now + self.fleet_every_s
            try:
                await self.refresh(with_fleet or self.snapshot.fleet is None)
                failure = None
            except Exception as exc:  # a failed read must not end live updates for good
                if repr(exc) != failure:  # said once, not four times a second
                    log.exception("dashboard: reading the run or the fleet failed; retrying")
                failure = repr(exc)
            await asyncio.sleep(self.poll_s)


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


async def event_stream(hub: Hub) -> AsyncIterator[str]:
    """Server-sent events for one page: ``run``, ``rounds`` and ``fleet``, each when it changed.

    ``rounds`` carries ``{"from": N, "lines": [...]}``: the page keeps its first N rounds and
    appends the lines, so a stream that reconnects (and starts from 0 again) never duplicates.
    """
    hub.streams += 1
    try:
        yield "retry: 2000\n\n"
        run_version = fleet_version = -1
        sent_rounds = 0
        while not hub.closing:
            snapshot = hub.snapshot
            if snapshot.run_version != run_version:
                run_version = snapshot.run_version
                yield _event("run", snapshot.run)
                if len(snapshot.rounds) < sent_rounds:  # another run in the folder: start over
                    sent_rounds = 0
            if len(snapshot.rounds) > sent_rounds:
                lines = ",".join(snapshot.rounds[sent_rounds:])
                yield _event("rounds", f'{{"from": {sent_rounds}, "lines": [{lines}]}}')
                sent_rounds = len(snapshot.rounds)
            if snapshot.fleet is not None and snapshot.fleet_version != fleet_version:
                fleet_version = snapshot.fleet_version
                yield _event("fleet", snapshot.fleet)
            if not await hub.changed(KEEPALIVE_S):
                yield ": keepalive\n\n"
    finally:
        hub.streams -= 1
