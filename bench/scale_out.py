"""Benchmark: a 100-client run on Flower's simulation runtime against the same run in
``fedcoreml demo`` style (coordinator + ``fedcoreml devices`` over gRPC on 127.0.0.1).

Both federate the reference model over Fashion-MNIST (60,000 training images, IID over 100
clients; 10 sampled per round; 1 local epoch, batch 32, lr 1e-3) with FedAvg, and judge every
round's .mlmodel on the 10,000 test images with the reference interpreter. Flower's run: the
app in this repository submitted with ``flwr run .`` to a simulation SuperLink (Ray backend,
``fedcoreml[simulation]``), timed from submission until ``flwr ls`` says it finished. The demo
style run: timed from the coordinator starting to listen until the last round is recorded.

    python bench/scale_out.py [--clients 100] [--rounds 3] [--data-dir ../shared/data/fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # FlowerRuntime: Flower's processes, as in tests

from federated_run import federated  # noqa: E402
from flower_runtime import FlowerRuntime  # noqa: E402


def on_flower(data_dir: str, clients: int, rounds: int, fraction: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        runtime = FlowerRuntime(Path(tmp))
        try:
            runtime.start_superlink(simulation=True)
            run_dir = Path(tmp) / "run"
            start = time.perf_counter()
            run_id = runtime.run_app(
                f"num-server-rounds={rounds} min-nodes={clients} fraction-train={fraction} "
                f"data-dir='{data_dir}' run-dir='{run_dir}' local-epochs=1 batch-size=32 "
                "lr=0.001",
                federation_config=f"num-supernodes={clients}",
            )
            status, details = runtime.wait(run_id, timeout=3600)
            wall = time.perf_counter() - start
            if status != "finished:completed":
                raise RuntimeError(f"{status}: {details}\n{runtime.run_log(run_id)[-3000:]}")
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            return wall, json.loads(lines[-1])["test_accuracy"]
        finally:
            runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    default_data = HERE.parent.parent / "shared" / "data" / "fashion-mnist"
    parser.add_argument("--data-dir", default=str(default_data))
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    print(f"{args.clients} clients, {round(args.clients * args.fraction)} per round, "
          f"{args.rounds} rounds, {data_dir}")  # fmt: skip
    flower_s, flower_acc = on_flower(data_dir, args.clients, args.rounds, args.fraction)
    print(f"  Flower simulation runtime (Ray):  {flower_s:7.1f} s, accuracy {flower_acc:.4f}")
    demo = federated(data_dir, args.clients, args.rounds, "iid", 32, 1e-3, fraction=args.fraction)
    print(f"  fedcoreml demo style (gRPC):      {demo.total_wall_s:7.1f} s, "
          f"accuracy {demo.accuracy:.4f}")  # fmt: skip
    print(f"  ratio Flower simulation / demo:   {flower_s / demo.total_wall_s:7.2f}")


if __name__ == "__main__":
    main()
