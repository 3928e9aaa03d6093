"""Benchmark: 20 % poisoned devices against FedAvg and Flower's robust strategies.

10 simulated iPhones (IID) on the given data, R rounds of 1 local epoch; 2 of them send
well-formed but poisoned updates (``--poison``: ``scale:-10`` by default, or ``random``). Each
strategy's final accuracy (coordinator, reference interpreter) is printed beside a clean FedAvg
run measured in the same invocation.

    python bench/poisoning.py [--data-dir DIR] [--rounds 5] [--poison scale:-10]
"""

from __future__ import annotations

import argparse

from federated_run import federated

# Krum and Multi-Krum are told how many devices may be malicious (2 of 10); Multi-Krum averages
# the n - f = 8 best-scored updates where Krum keeps one.
ROBUST_ARGS = {
    "krum": {"num_malicious_nodes": 2},
    "multikrum": {"num_malicious_nodes": 2, "num_nodes_to_select": 8},
}


def run(strategy: str, poison_fraction: float, args: argparse.Namespace) -> float:
    fleet = ("--poison-fraction", str(poison_fraction), "--poison", args.poison)
    result = federated(
        args.data_dir, 10, args.rounds, "iid", 32, 1e-3, strategy=strategy,
        strategy_args=ROBUST_ARGS.get(strategy, {}), fleet_args=fleet,
    )  # fmt: skip
    return result.accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="default: the bundled MNIST sample")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--poison", default="scale:-10")
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"10 devices (2 poisoned: {args.poison}), {args.rounds} rounds, data "
          f"{args.data_dir or 'bundled sample'}")  # fmt: skip
    clean = run("fedavg", 0.0, args)
    print(f"{'FedAvg, no poisoned devices':34s} {clean:.4f}")
    for strategy in ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"):
        accuracy = run(strategy, 0.2, args)
        print(f"{strategy + ', 20 % poisoned':34s} {accuracy:.4f} "
              f"({(accuracy - clean) * 100:+.1f} points)")  # fmt: skip


if __name__ == "__main__":
    main()
