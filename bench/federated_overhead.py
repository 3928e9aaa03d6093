"""Benchmark: the cost of federation itself, against the same local training done directly.

10 simulated iPhones (IID), 1 local epoch per round: the federated run over real gRPC on
127.0.0.1 (coordinator in one process, the fleet in another, server-side evaluation of every
round's .mlmodel included) against the same per-device emulator training and averaging in one
process. Each measurement runs in a fresh process, alternating, and the medians are compared.

    python bench/federated_overhead.py [--data-dir DIR] [--devices 10] [--rounds 3] [--repeats 2]

Target: federated / direct <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys


def _measure(args: argparse.Namespace, which: str) -> dict:
    from federated_run import direct, federated

    common = (args.data_dir, args.devices, args.rounds, "iid", args.batch_size, args.lr)
    if which == "direct":
        seconds, accuracy = direct(*common)
        return {"seconds": seconds, "accuracy": accuracy}
    run = federated(*common, eval_data=args.eval_data_dir)
    return {"seconds": run.rounds_wall_s, "with_startup": run.total_wall_s,
            "accuracy": run.accuracy}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="default: the bundled MNIST sample")
    parser.add_argument(
        "--eval-data-dir", help="the coordinator's held-out set (default: --data-dir's test set)"
    )
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["direct", "federated"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(_measure(args, args.only)))
        return
    print(f"{args.devices} devices, {args.rounds} rounds x 1 local epoch, batch "
          f"{args.batch_size}, lr {args.lr:g}, data {args.data_dir or 'bundled sample'}, "
          f"server evaluation on {args.eval_data_dir or args.data_dir or 'bundled sample'}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    results: dict[str, list[dict]] = {"direct": [], "federated": []}
    passthrough = [a for a in sys.argv[1:]]
    for repeat in range(args.repeats):
        order = ["direct", "federated"] if repeat % 2 == 0 else ["federated", "direct"]
        for which in order:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--only", which],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[which].append(result)
            print(f"  run {repeat + 1} {which:9s} {result['seconds']:7.2f} s  "
                  f"accuracy {result['accuracy']:.4f}")  # fmt: skip
    direct_s = statistics.median(r["seconds"] for r in results["direct"])
    fed_s = statistics.median(r["seconds"] for r in results["federated"])
    startup_s = statistics.median(r["with_startup"] for r in results["federated"])
    print(f"direct (emulator, one process): {direct_s:7.2f} s (median)")
    print(f"federated rounds:               {fed_s:7.2f} s (median; {startup_s:.2f} s with the "
          "fleet's start-up)")  # fmt: skip
    print(f"ratio federated / direct: {fed_s / direct_s:.3f} (target <= 1.10); "
          f"with start-up {startup_s / direct_s:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
