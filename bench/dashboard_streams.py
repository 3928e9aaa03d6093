"""Benchmark: round times of one run with 0 and with 50 open dashboard event streams.

One federated run (coordinator and dashboard in this process, ``fedcoreml devices`` in another,
as ``fedcoreml demo`` runs them) whose rounds alternate in blocks: no page open, then 50 pages
holding ``/api/events`` open, then none again ... The 50 streams live in a third process (as
browsers would, elsewhere): half read every event, half never read a byte after connecting (a
stalled browser). A round counts for a side only if the streams were open (or closed) for the
whole of it; the rounds during a switch are left out.

    python bench/dashboard_streams.py [--devices 10] [--rounds 16] [--block 4] [--streams 50]
                                      [--limit 1000] [--data-dir DIR]

Target: median round time with streams / without <= 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# -- the pages: a separate process holding event streams open ---------------------------------


async def _stream(port: int, reading: bool, opened: asyncio.Event, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    events = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"event:"):
                events += 1
                counts.append(1)
                if not opened.is_set():
                    opened.set()
                    if not reading:  # a stalled page: connected, then never reads again
                        await asyncio.Event().wait()
    finally:
        writer.close()


async def _hold_streams(port: int, count: int) -> None:
    """Open and close ``count`` streams on the commands read from stdin; report on stdout."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    counts: list[int] = []
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "open":
            counts.clear()
            flags = [asyncio.Event() for _ in range(count)]
            tasks = [
                asyncio.create_task(_stream(port, i % 2 == 0, flags[i], counts))
                for i in range(count)
            ]
            await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in flags)), 30)
            print(json.dumps({"opened": count, "at": time.time()}), flush=True)
        elif command == "close":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            print(json.dumps({"closed": count, "at": time.time(), "events": len(counts)}),
                  flush=True)  # fmt: skip
        else:
            return


class Pages:
    """The stream process, driven from the benchmark."""

    def __init__(self, port: int, count: int) -> None:
        self.count = count
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--hold-streams", str(port), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.intervals: list[tuple[float, float]] = []
        self.events = 0
        self._opened_at: float | None = None

    def _say(self, command: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def open(self) -> None:
        self._say("open")
        # a round counts as "with streams" only from when every stream is open
        self._opened_at = time.time()

    def close(self) -> None:
        closing = time.time()
        answer = self._say("close")
        if self._opened_at is not None:
            self.intervals.append((self._opened_at, closing))
            self._opened_at = None
        self.events += answer["events"]

    def stop(self) -> None:
        if self._opened_at is not None:
            self.close()
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=30)


# -- the run ------------------------------------------------------------------------------------


def _switch_at_block_ends(coordinator, pages: Pages, block: int, done: threading.Event) -> None:
    """Open the streams after rounds block, 3*block, ...; close them after 2*block, 4*block, ..."""
    switched = 0
    while not done.wait(0.02):
        rounds = sum(1 for s in coordinator.grid.history if s.kind == "train")
        if rounds // block > switched:
            switched = rounds // block
            if switched % 2 == 1:
                pages.open()
            else:
                pages.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--block", type=int, default=4, help="rounds per block (default 4)")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--limit", type=int, default=1000, help="training examples in all")
    parser.add_argument("--data-dir", help="default: the bundled MNIST sample")
    parser.add_argument("--hold-streams", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold_streams:
        asyncio.run(_hold_streams(*args.hold_streams))
        return

    from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
    from fedcoreml.server.dashboard import start_dashboard

    print(f"{args.devices} simulated iPhones ({args.limit} examples in all), {args.rounds} "
          f"rounds; {args.streams} event streams ({args.streams // 2} reading, the others "
          f"stalled) open in alternate blocks of {args.block} rounds; {platform.machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        config = CoordinatorConfig(
            run_dir=Path(tmp) / "run", rounds=args.rounds, min_devices=args.devices,
            listen="127.0.0.1:0", poll_interval_ms=100, eval_data=args.data_dir,
        )  # fmt: skip
        coordinator = Coordinator(config)
        port = coordinator.start()
        dashboard = start_dashboard(coordinator, "127.0.0.1:0")
        pages = Pages(dashboard.port, args.streams)
        fleet_command = [sys.executable, "-m", "fedcoreml.server.cli", "devices", "--server",
                         f"127.0.0.1:{port}", "--count", str(args.devices), "--limit",
                         str(args.limit)]  # fmt: skip
        if args.data_dir:
            fleet_command += ["--data-dir", args.data_dir]
        fleet = subprocess.Popen(
            fleet_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        done = threading.Event()
        switcher = threading.Thread(
            target=_switch_at_block_ends, args=(coordinator, pages, args.block, done), daemon=True
        )
        switcher.start()
        try:
            coordinator.run()
        finally:
            done.set()
            switcher.join()
            pages.stop()
            coordinator.stop()
            dashboard.stop()
            fleet.wait(timeout=120)
    # a round's time as metrics.jsonl records it: its exchanges plus building its model
    seconds = {r.round: r.seconds for r in coordinator.records}
    sides: dict[str, list[float]] = {"without": [], "with": []}
    for exchange in coordinator.grid.history:
        if exchange.kind != "train":
            continue
        start, end = exchange.started_at, exchange.started_at + exchange.seconds
        if any(opened <= start and end <= closed for opened, closed in pages.intervals):
            sides["with"].append(seconds[exchange.round])
        elif not any(start < closed and opened < end for opened, closed in pages.intervals):
            sides["without"].append(seconds[exchange.round])
    if not sides["with"] or not sides["without"]:
        sys.exit("no whole round on one side of a switch: give more --rounds or a larger --block")
    for side, label in (("without", "no event stream"),
                        ("with", f"{args.streams} open event streams")):  # fmt: skip
        times = sides[side]
        print(f"rounds with {label}: {len(times)}, median {statistics.median(times):.3f} s, "
              f"mean {statistics.mean(times):.3f} s (" + ", ".join(f"{t:.2f}" for t in times)
              + ")")  # fmt: skip
    ratio = statistics.median(sides["with"]) / statistics.median(sides["without"])
    print(f"events delivered to the reading streams: {pages.events:,}")
    print(f"median round time with / without {args.streams} streams: {ratio:.3f}")


if __name__ == "__main__":
    main()
