"""Benchmark: the cost of committing a round durably, next to the time a round takes.

A round is committed before any device can be told of its model (see server/federated_run.py):
its .mlmodel written atomically (temporary file, fsync, rename, fsync of the folder), then its
line in commits.jsonl the same way. This is on the round's critical path, so this bench measures:

1. the commit alone, as the coordinator does it (``RunDirectory.write_round_model`` +
   ``append_commit``), of the reference model (2.3 MB), ``--repeats`` times in a fresh run
   directory on the disk of ``--dir``; and, as the baseline of what durability costs, the same
   writes without any fsync;
2. a short real run in the same process (coordinator + ``fedcoreml devices`` on 127.0.0.1, as
   ``fedcoreml demo``): the round time (``seconds`` in metrics.jsonl: the exchanges with the
   devices plus building the model) and every commit the coordinator made, timed in place.

    python bench/commit_cost.py [--repeats 20] [--devices 10] [--rounds 3] [--dir .]

Prints the commit's median and p90, and its share of the median round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex, spec_to_bytes
from fedcoreml.server.run_dir import RunDirectory


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def durable_commit(directory: RunDirectory, round_number: int, model: bytes, line: dict) -> None:
    """The coordinator's commit: the model file, then its record, each atomic and fsync'd."""
    directory.write_round_model(round_number, model)
    directory.append_commit(line)


def unsynced_commit(folder: Path, round_number: int, model: bytes, record: str) -> None:
    """The same files written the same way (temporary file, rename) without any fsync."""
    for target, content in ((folder / f"round-{round_number:04d}.mlmodel", model),
                            (folder / "commits.jsonl", record.encode())):  # fmt: skip
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, target)


def commit_times(folder: Path, data: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per commit of ``data``: (durable, without fsync), alternating which goes first.

    Each round's model differs by a byte, so that no layer below can skip an unchanged write.
    """
    directory = RunDirectory(folder / "durable")
    directory.write_config({"run_id": 0})
    unsynced = folder / "unsynced"
    unsynced.mkdir()
    durable_s: list[float] = []
    unsynced_s: list[float] = []
    record = ""
    for round_number in range(repeats):
        model = data[:-1] + bytes([round_number % 256])
        line = {"round": round_number, "model_sha256": sha256_hex(model), "size_bytes": len(model)}
        record += json.dumps(line) + "\n"
        order = [
            (durable_s, durable_commit, directory, line),
            (unsynced_s, unsynced_commit, unsynced, record),
        ]
        for times, write, where, what in order if round_number % 2 else order[::-1]:
            start = time.perf_counter()
            write(where, round_number, model, what)
            times.append(time.perf_counter() - start)
    return durable_s, unsynced_s


def real_run(devices: int, rounds: int) -> tuple[list[float], list[float]]:
    """(seconds per round from metrics, seconds per commit the coordinator made) of a real run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from federated_run import federated

    from fedcoreml.server.federated_run import FederatedRun

    commits: list[float] = []
    original = FederatedRun._commit

    def timed_commit(self, model, fields):
        start = time.perf_counter()
        done = original(self, model, fields)
        if done:
            commits.append(time.perf_counter() - start)
        return done

    FederatedRun._commit = timed_commit  # measure the coordinator's own commits in place
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round summary
    try:
        run = federated(None, devices, rounds, "iid", batch=32, lr=1e-3)
    finally:
        FederatedRun._commit = original
    return [r.seconds for r in run.records if r.round > 0], commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="of the real run (0: skip it)")
    parser.add_argument("--dir", type=Path, default=Path("."), help="a folder on the disk to test")
    args = parser.parse_args()
    data = spec_to_bytes(build_default_model(seed=0))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".commit-cost-") as tmp:
        durable, unsynced = commit_times(Path(tmp), data, args.repeats)
    commit_s, p90_s = statistics.median(durable), _percentile(durable, 0.9)
    print(f"model: {len(data):,} bytes; {args.repeats} commits in {args.dir.resolve()}")
    print(f"durable commit (file, record, folder fsync'd): median {commit_s * 1000:.1f} ms, "
          f"p90 {p90_s * 1000:.1f} ms")  # fmt: skip
    print(f"the same writes without fsync: median {statistics.median(unsynced) * 1000:.1f} ms")
    if args.rounds <= 0:
        return
    rounds, in_run = real_run(args.devices, args.rounds)
    round_s, in_run_s = statistics.median(rounds), statistics.median(in_run)
    print(f"real run ({args.devices} devices, {args.rounds} rounds, bundled sample): median round "
          f"{round_s:.2f} s; its {len(in_run)} commits: median {in_run_s * 1000:.1f} ms, max "
          f"{max(in_run) * 1000:.1f} ms")  # fmt: skip
    print(f"ratio durable commit / round: {commit_s / round_s:.5f} ({commit_s / round_s:.2%}; "
          f"the run's own commits {in_run_s / round_s:.2%})")  # fmt: skip


if __name__ == "__main__":
    main()
