"""Benchmark: asynchronous FedBuff against synchronous FedAvg on a fleet of unreliable phones.

One run, one machine: ``fedcoreml server`` and ``fedcoreml devices`` as separate processes on
127.0.0.1; 20 simulated devices on real MNIST (``../shared/data/mnist``, 5,000 training images),
30 % of them 4x slower, 10 % vanishing mid-task and coming back later; every model judged by the
coordinator on the 10,000 real test images. First synchronous FedAvg for R rounds, then FedBuff
on the same fleet settings, stopped once it has run as long as FedAvg did (times a margin).

    python bench/async_vs_sync.py [--rounds 8] [--devices 20] [--buffer 5] [--concurrency 10]

Reported: the wall time FedBuff needs to reach the accuracy FedAvg has after R rounds (the
``elapsed_s`` of the first version at or above it) against FedAvg's, as a ratio (goal >= 2x
faster); and both accuracies at FedAvg's total wall time (goal: within 0.5 points).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CLI = [sys.executable, "-m", "fedcoreml.server.cli"]


@dataclass
class Point:
    """One judged model: its round (FedAvg) or version (FedBuff), wall time and accuracy."""

    step: int
    elapsed_s: float
    accuracy: float


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_curve(metrics: Path) -> list[Point]:
    """Judged models in ``metrics.jsonl`` (the initial model, with no wall time, left out)."""
    if not metrics.exists():
        return []
    points = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("elapsed_s") is None or record.get("test_accuracy") is None:
            continue
        points.append(Point(int(record["round"]), float(record["elapsed_s"]),
                            float(record["test_accuracy"])))  # fmt: skip
    return sorted(points, key=lambda p: p.step)


def fleet_command(args: argparse.Namespace, port: int) -> list[str]:
    """The same simulated fleet for both runs (same seed: same slow and vanishing devices)."""
    return [*CLI, "devices", "--server", f"127.0.0.1:{port}", "--count", str(args.devices),
            "--data-dir", args.data_dir, "--seed", str(args.seed),
            "--slow-fraction", str(args.slow_fraction), "--slow-factor", str(args.slow_factor),
            "--drop-fraction", str(args.drop_fraction),
            "--drop-probability", str(args.drop_probability),
            "--rejoin-after", str(args.rejoin_after),
            "--concurrent-training", str(args.concurrent_training),
            "--give-up-after", "30", "-q"]  # fmt: skip


def server_command(args: argparse.Namespace, port: int, run_dir: Path, sync: bool) -> list[str]:
    """``fedcoreml server`` for FedAvg (``sync``) or FedBuff, with the same local training."""
    command = [*CLI, "server", "--listen", f"127.0.0.1:{port}", "--insecure",
               "--run-dir", str(run_dir), "--min-devices", str(args.devices),
               "--eval-data-dir", args.data_dir, "--local-epochs", str(args.local_epochs),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--session-ttl", str(args.session_ttl), "--poll-interval-ms", "200",
               "-q"]  # fmt: skip
    if sync:
        return [*command, "--strategy", "fedavg", "--rounds", str(args.rounds)]
    command += ["--strategy", "fedbuff", "--versions", str(args.max_versions),
                "--concurrency", str(args.concurrency), "--buffer", str(args.buffer),
                "--max-staleness", str(args.max_staleness)]  # fmt: skip
    for option in args.strategy_arg:
        command += ["--strategy-arg", option]
    return command


def run(args: argparse.Namespace, sync: bool, stop_after_s: float | None) -> list[Point]:
    """One run; FedBuff is stopped (SIGTERM) once a version was committed after ``stop_after_s``."""
    with tempfile.TemporaryDirectory(prefix="async-vs-sync-") as tmp:
        run_dir, port = Path(tmp) / "run", free_port()
        log = Path(tmp) / "server.log"
        with log.open("w") as log_file:
            server = subprocess.Popen(server_command(args, port, run_dir, sync),
                                      stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
            fleet = subprocess.Popen(fleet_command(args, port), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                while server.poll() is None:
                    time.sleep(0.5)
                    curve = read_curve(run_dir / "metrics.jsonl")
                    if stop_after_s is not None and curve and curve[-1].elapsed_s >= stop_after_s:
                        server.send_signal(signal.SIGTERM)
                        server.wait(timeout=60)
            finally:
                for process in (server, fleet):
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                for process in (server, fleet):
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        curve = read_curve(run_dir / "metrics.jsonl")
        if server.returncode not in (0, 143) or not curve:
            sys.exit(f"the {'FedAvg' if sync else 'FedBuff'} server failed (exit "
                     f"{server.returncode}):\n{log.read_text()[-3000:]}")  # fmt: skip
        return curve


def first_at_or_above(curve: list[Point], accuracy: float) -> Point | None:
    """The earliest model at least this accurate (None: never reached)."""
    return next((p for p in curve if p.accuracy >= accuracy), None)


def accuracy_at(curve: list[Point], elapsed_s: float) -> Point | None:
    """The newest model committed by this wall time (None: none yet)."""
    done = [p for p in curve if p.elapsed_s <= elapsed_s]
    return done[-1] if done else None


def print_curve(name: str, label: str, curve: list[Point]) -> None:
    print(f"{name} ({label}, elapsed s, test accuracy):")
    for p in curve:
        print(f"  {label} {p.step:3d}  {p.elapsed_s:7.1f} s  {p.accuracy:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="FedAvg rounds (R)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--slow-fraction", type=float, default=0.3)
    parser.add_argument("--slow-factor", type=float, default=4.0)
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--drop-probability", type=float, default=0.5)
    parser.add_argument("--rejoin-after", type=float, default=10.0)
    parser.add_argument("--session-ttl", type=float, default=30.0)
    parser.add_argument("--concurrent-training", type=int, default=1)
    # the fleet trains one device at a time on 2 cores: more tasks in flight only wait and go stale
    parser.add_argument("--concurrency", type=int, default=10, help="FedBuff --concurrency")
    parser.add_argument("--buffer", type=int, default=5, help="FedBuff --buffer")
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--max-versions", type=int, default=1000)
    parser.add_argument("--strategy-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="FedBuff --strategy-arg (repeatable)")  # fmt: skip
    parser.add_argument("--margin", type=float, default=1.2,
                        help="run FedBuff this many times FedAvg's wall time")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.data_dir).is_dir():
        sys.exit(f"--data-dir {args.data_dir} is not a directory (see ../shared/data/README.md)")
    if args.margin < 1:
        sys.exit(f"--margin must be at least 1 (FedBuff must run as long as FedAvg), got "
                 f"{args.margin}")  # fmt: skip

    print(f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"{args.devices} devices on {args.data_dir}: {args.slow_fraction:.0%} "
          f"{args.slow_factor:g}x slower, {args.drop_fraction:.0%} vanishing "
          f"(p={args.drop_probability:g} per task, "
          f"back after {args.rejoin_after:g} s); {args.concurrent_training} training at once; "
          f"local: {args.local_epochs} epoch(s), batch {args.batch_size}, lr {args.lr:g}; "
          f"session TTL {args.session_ttl:g} s")  # fmt: skip
    print(f"FedAvg: {args.rounds} rounds, every device. FedBuff: concurrency {args.concurrency}, "
          f"buffer {args.buffer}, max staleness {args.max_staleness}, "
          f"{' '.join(args.strategy_arg) or 'default discount 1/sqrt(1+s)'}; "
          f"stopped after {args.margin:g}x FedAvg's wall time", flush=True)  # fmt: skip

    sync = run(args, sync=True, stop_after_s=None)
    print_curve("FedAvg", "round", sync)
    target, sync_time = sync[-1].accuracy, sync[-1].elapsed_s
    buff = run(args, sync=False, stop_after_s=sync_time * args.margin)
    print_curve("FedBuff", "version", buff)

    reached = first_at_or_above(buff, target)
    if reached is None:
        best = max(p.accuracy for p in buff)
        print(f"FedBuff did not reach FedAvg's {target:.4f} in {buff[-1].elapsed_s:.1f} s "
              f"(best {best:.4f}); FedAvg took {sync_time:.1f} s")  # fmt: skip
    else:
        print(f"to {target:.4f} (FedAvg after {args.rounds} rounds): FedAvg {sync_time:.1f} s, "
              f"FedBuff {reached.elapsed_s:.1f} s (version {reached.step}): "
              f"{sync_time / reached.elapsed_s:.2f}x faster (goal >= 2)")  # fmt: skip
    same_time = accuracy_at(buff, sync_time)
    if same_time is None:
        print(f"FedBuff committed no version within FedAvg's {sync_time:.1f} s")
    else:
        gap = (same_time.accuracy - target) * 100
        print(f"at FedAvg's {sync_time:.1f} s: FedAvg {target:.4f}, "
              f"FedBuff {same_time.accuracy:.4f} (version {same_time.step}, {gap:+.2f} points; "
              f"goal within 0.5)")  # fmt: skip
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
