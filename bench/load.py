"""Benchmark: 1,000 protocol-level devices against one coordinator on 127.0.0.1.

The coordinator is the real ``fedcoreml server`` in its own process. The devices are the
reference :class:`~fedcoreml.ios_bridge.device_client.DeviceClient`, one thread and one gRPC
channel each, in a few load processes: they do what the iOS app does — register, poll GetTask as
told, download and verify the round's .mlmodel, submit an update — but do not train: their
updates are random tensors of the model's real shapes (585,958 parameters, 2.3 MB each).

Reported per configuration: rounds completed, errors, p50/p99/max latency of GetTask,
DownloadModel and SubmitUpdate as the devices saw them, and the coordinator's peak resident
memory and CPU (from /proc, sampled every 0.1 s). Targets: p99 GetTask < 50 ms; the
coordinator's memory must not grow with the number of updates a round receives.

Memory is shown against a baseline measured in the same run: the same coordinator with
``--hold-updates`` (every update kept until the round closes, as Flower's strategies otherwise
need), at a quarter and at the full fleet.

    python bench/load.py [--devices 1000] [--rounds 3] [--poll-interval-ms 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.device_client import (
    DeviceClient,
    EvaluationResult,
    RefusedError,
    RetryPolicy,
    TrainResult,
)
from fedcoreml.ios_bridge.parameters import parameter_infos
from fedcoreml.ios_bridge.wire import device_pb2

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Load devices wait out a busy coordinator rather than give up.
PATIENT = RetryPolicy(initial_backoff=0.5, max_backoff=10.0, give_up_after=900.0, rpc_timeout=600.0)


@dataclass
class Calls:
    """Latencies and errors of one process's devices (thread-safe)."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {
        "GetTask": [], "DownloadModel": [], "SubmitUpdate": [], "scheduling lag": []})  # fmt: skip
    errors: Counter = field(default_factory=Counter)
    updates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, rpc: str, seconds: float, refusal: RefusedError | None) -> None:
        with self.lock:
            if refusal is not None:
                self.errors[f"{rpc} {refusal.code.name}: {refusal.message[:60]}"] += 1
            elif rpc in self.latencies:
                self.latencies[rpc].append(seconds)
                self.updates += rpc == "SubmitUpdate"


class ProcessWatch:
    """Samples a process's resident memory and CPU time from /proc until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0
        self.rss_after_start_mb = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/statm") as statm:
                    rss_mb = int(statm.read().split()[1]) * PAGE_KB / 1024
                with open(f"/proc/{self.pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                self.cpu_s = (int(fields[11]) + int(fields[12])) / TICKS
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
            time.sleep(0.1)

    def mark_started(self) -> None:
        self.rss_after_start_mb = self.peak_rss_mb

    def join(self) -> None:
        self._thread.join(timeout=5)


class RandomTrainer:
    """A device that does not train: random tensors of the model's real shapes, drawn from a
    small pool made once per process (585,958 parameters, 2.3 MB each)."""

    def __init__(self, pool: list[list[tuple[str, np.ndarray]]], seed: int) -> None:
        self.pool = pool
        self.rng = random.Random(seed)

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        parameters = self.pool[self.rng.randrange(len(self.pool))]
        return TrainResult(parameters, self.rng.randint(20, 600), 0.5, 0.5, 1.0)

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        return EvaluationResult(100, 0.5, 0.5)


def random_updates(pool: int) -> list[list[tuple[str, np.ndarray]]]:
    infos = parameter_infos(build_default_model(seed=0))
    rng = np.random.default_rng(0)
    return [
        [(i.name, rng.standard_normal(i.shape).astype(np.float32) * 0.05) for i in infos]
        for _ in range(pool)
    ]


def run_devices(address: str, prefix: str, first: int, count: int, pool: int, calls: Calls) -> None:
    """``count`` DeviceClients on threads of this process, each on its own channel, to the end."""
    updates = random_updates(pool)

    def one(index: int) -> None:
        try:
            with open_channel(address) as channel:
                client = DeviceClient(
                    channel, f"{prefix}-{index:05d}", RandomTrainer(updates, index),
                    platform="load", retry=PATIENT, seed=index, on_call=calls.observe,
                )  # fmt: skip
                client.run()
        except Exception as exc:  # counted, and the other devices go on
            with calls.lock:
                calls.errors[f"device crashed: {type(exc).__name__}: {exc}"[:90]] += 1

    stop = threading.Event()
    lag = threading.Thread(target=scheduling_lag, args=(calls, stop), daemon=True)
    lag.start()
    threads = [threading.Thread(target=one, args=(i,), daemon=True)
               for i in range(first, first + count)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    lag.join()


def scheduling_lag(calls: Calls, stop: threading.Event) -> None:
    """How late a thread of this process wakes up: client-side delay inside every latency."""
    while not stop.is_set():
        begin = time.perf_counter()
        time.sleep(0.01)
        with calls.lock:
            calls.latencies["scheduling lag"].append(time.perf_counter() - begin - 0.01)


PROBE_DEVICES = 20


def probe(address: str, out: Path) -> None:
    """A few devices in a process of their own: the latency a phone sees, without the fleet's
    thousand threads in the way (their delay is the fleet's "scheduling lag")."""
    calls = Calls()
    run_devices(address, "probe", 0, PROBE_DEVICES, 1, calls)
    out.write_text(json.dumps({k: calls.latencies[k] for k in ("GetTask", "SubmitUpdate")}))


def fleet_process(address: str, first: int, count: int, out: Path) -> None:
    """One share of the fleet, as threads of this process; results go to ``out``.

    Niced: on a small machine the load generator shares the coordinator's cores, and the
    coordinator, the system under test, should not wait for the generator's CPU.
    """
    os.nice(10)
    calls = Calls()
    run_devices(address, "load", first, count, 8, calls)
    out.write_text(json.dumps({"latencies": calls.latencies, "errors": dict(calls.errors),
                               "updates": calls.updates}))  # fmt: skip


def run(
    devices: int, rounds: int, poll_ms: int, hold: bool, processes: int, handout_rate: float
) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fedcoreml-load-"))
    command = [
        sys.executable, "-m", "fedcoreml.server.cli", "server", "--insecure",
        "--listen", "127.0.0.1:0", "--run-dir", str(run_dir), "--rounds", str(rounds),
        "--min-devices", str(devices), "--round-timeout", "900", "--session-ttl", "600",
        "--poll-interval-ms", str(poll_ms), "--long-poll-ms", "0",
        "--handout-rate", str(handout_rate),
        "--local-epochs", "1", "--batch-size", "32",
        *(["--hold-updates"] if hold else []),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = ProcessWatch(server.pid)
    log: list[str] = []
    port = None
    while port is None:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("the coordinator did not start:\n" + "".join(log))
        log.append(line)
        match = re.search(r"listening for devices on port (\d+)", line)
        port = int(match.group(1)) if match else None
    drain = threading.Thread(target=lambda: log.extend(server.stdout), daemon=True)
    drain.start()
    time.sleep(0.5)
    watch.mark_started()
    calls = Calls()
    address = f"127.0.0.1:{port}"
    probe_out = run_dir / "probe.json"
    start = time.perf_counter()
    prober = subprocess.Popen([sys.executable, __file__, "--probe", address, str(probe_out)])
    shares = np.array_split(np.arange(devices - PROBE_DEVICES), processes)
    fleets = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--fleet",
                address,
                str(share[0]),
                str(len(share)),
                str(run_dir / f"fleet-{i}.json"),
            ]
        )
        for i, share in enumerate(shares)
    ]
    for process in fleets:
        process.wait()
    wall = time.perf_counter() - start
    server.wait(timeout=300)
    prober.wait(timeout=60)
    for i in range(len(fleets)):
        path = run_dir / f"fleet-{i}.json"
        if not path.exists():
            calls.errors[f"fleet process {i} failed"] += 1
            continue
        share = json.loads(path.read_text())
        for name, values in share["latencies"].items():
            calls.latencies[name].extend(values)
        calls.errors.update(share["errors"])
        calls.updates += share["updates"]
    probed = json.loads(probe_out.read_text()) if probe_out.exists() else {}
    if not probed:
        calls.errors["probe failed"] += 1
    drain.join(timeout=5)
    watch.join()
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines() if server.returncode == 0 else []
    if server.returncode != 0:
        print("".join(log[-30:]), file=sys.stderr)
    return {
        "devices": devices,
        "mode": "hold every update" if hold else "mean on arrival",
        "rounds": max(len(metrics) - 1, 0),
        "updates": calls.updates,
        "errors": sum(calls.errors.values()),
        "error_kinds": dict(calls.errors.most_common(5)),
        "wall_s": wall,
        "latency_ms": {name: percentiles(values) for name, values in calls.latencies.items()},
        "probe_ms": {name: percentiles(values) for name, values in probed.items()},
        "peak_rss_mb": watch.peak_rss_mb,
        "start_rss_mb": watch.rss_after_start_mb,
        "cpu_s": watch.cpu_s,
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ms = np.asarray(values) * 1000
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}  # fmt: skip


def report(result: dict) -> None:
    lat = result["latency_ms"]
    print(
        f"\n{result['devices']:,} devices, {result['mode']}: {result['rounds']} rounds, "
        f"{result['updates']:,} updates, {result['errors']} errors in {result['wall_s']:.1f} s"
    )
    rows = [(f"{name} (fleet)", lat[name]) for name in ("GetTask", "DownloadModel",
            "SubmitUpdate")]  # fmt: skip
    rows += [("fleet scheduling lag", lat["scheduling lag"])]
    rows += [(f"{name} (probe)", item) for name, item in result["probe_ms"].items()]
    for name, item in rows:
        print(f"  {name:<22} n={item['n']:>6,}  p50 {item['p50']:8.1f} ms  "
              f"p99 {item['p99']:8.1f} ms  max {item['max']:8.1f} ms")  # fmt: skip
    print(
        f"  coordinator: peak RSS {result['peak_rss_mb']:,.0f} MB "
        f"(idle {result['start_rss_mb']:,.0f} MB), CPU {result['cpu_s']:.1f} s = "
        f"{result['cpu_s'] / result['wall_s']:.2f} cores"
    )
    if result["error_kinds"]:
        print(f"  errors: {result['error_kinds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-interval-ms", type=int, default=1000)
    parser.add_argument("--no-baseline", action="store_true", help="skip the --hold-updates runs")
    parser.add_argument(
        "--processes", type=int, default=2, help="load-generating processes (default 2)"
    )
    parser.add_argument(
        "--handout-rate", type=float, default=250.0,
        help="the coordinator's --handout-rate (tasks per second; its default, 250)",
    )  # fmt: skip
    parser.add_argument("--probe", nargs=2, metavar=("ADDRESS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--fleet", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], Path(args.probe[1]))
        return
    if args.fleet:
        address, first, count, out = args.fleet
        fleet_process(address, int(first), int(count), Path(out))
        return
    if args.devices // 4 <= PROBE_DEVICES:
        parser.error(
            f"--devices must be at least {4 * (PROBE_DEVICES + 1)}: a quarter of the "
            f"fleet, the small run, must outnumber the {PROBE_DEVICES} probe devices"
        )
    quarter = args.devices // 4
    configs = [(quarter, False), (args.devices, False)]
    if not args.no_baseline:
        configs += [(quarter, True), (args.devices, True)]
    results = []
    for devices, hold in configs:
        results.append(
            run(devices, args.rounds, args.poll_interval_ms, hold, args.processes,
                args.handout_rate)
        )  # fmt: skip
        report(results[-1])
    print("\nCoordinator peak memory, MB (growth from a quarter to the full fleet):")
    print(f"  {'mode':<20}{quarter:>10,}{args.devices:>10,}{'growth':>10}")
    for hold in (False, True):
        rows = [r for r in results if (r["mode"] == "hold every update") == hold]
        if len(rows) == 2:
            low, high = rows[0]["peak_rss_mb"], rows[1]["peak_rss_mb"]
            print(f"  {rows[0]['mode']:<20}{low:>10,.0f}{high:>10,.0f}{high / low:>9.2f}x")
    full = results[1]
    ok = full["rounds"] == args.rounds and full["errors"] == 0
    p99 = full["latency_ms"]["GetTask"]["p99"]
    probe_p99 = full["probe_ms"].get("GetTask", {}).get("p99", float("nan"))
    print(
        f"\nfull fleet: rounds complete and no errors: {'yes' if ok else 'NO'}; p99 GetTask "
        f"{p99:.1f} ms as the fleet saw it, {probe_p99:.1f} ms at the probe (target < 50 ms)"
    )


if __name__ == "__main__":
    main()
