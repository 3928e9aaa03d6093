"""Benchmark: federated accuracy against centralised training at the same sample-epochs.

FedAvg with 10 simulated iPhones on ../shared/data/mnist (5,000 real training images), R rounds
of 1 local epoch, judged by the coordinator on the 10,000 real test images; beside it, one model
trained centrally for R epochs on the union of the devices' training data (same examples, same
batch size and learning rate), and a Dirichlet(0.5) label-skewed federated run.

    python bench/federated_accuracy.py [--data-dir ../shared/data/mnist] [--rounds 8]

Target: IID FedAvg within 1 point of centralised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _measure(args: argparse.Namespace, which: str) -> dict:
    from federated_run import centralised, federated

    if which == "centralised":
        accuracy = centralised(args.data_dir, args.devices, args.rounds, "iid",
                               args.batch_size, args.lr)  # fmt: skip
        return {"accuracy": accuracy}
    partition = "iid" if which == "iid" else "dirichlet:0.5"
    run = federated(args.data_dir, args.devices, args.rounds, partition, args.batch_size,
                    args.lr)  # fmt: skip
    return {"accuracy": run.accuracy, "seconds": run.rounds_wall_s,
            "curve": [r.test_accuracy for r in run.records]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--only", choices=["centralised", "iid", "dirichlet"],
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.only:
        print(json.dumps(_measure(args, args.only)))
        return
    print(f"{args.devices} devices, {args.rounds} rounds x 1 local epoch vs {args.rounds} "
          f"centralised epochs; batch {args.batch_size}, lr {args.lr:g}; {args.data_dir}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    results = {}
    for which in ("centralised", "iid", "dirichlet"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", which],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    central = results["centralised"]["accuracy"]
    print(f"centralised:              {central:.4f}")
    for which, label in (("iid", "FedAvg IID"), ("dirichlet", "FedAvg Dirichlet(0.5)")):
        r = results[which]
        curve = " ".join(f"{a:.3f}" for a in r["curve"])
        print(f"{label + ':':25s} {r['accuracy']:.4f} ({(r['accuracy'] - central) * 100:+.2f} "
              f"points; {r['seconds']:.0f} s; per round: {curve})")  # fmt: skip
    gap = (central - results["iid"]["accuracy"]) * 100
    print(f"IID gap to centralised: {gap:.2f} points (target <= 1)")


if __name__ == "__main__":
    main()
