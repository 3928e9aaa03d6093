"""Benchmark: the coordinator's cost of aggregating K device updates of the reference model.

For K = 10, 100, 1,000 updates of all 585,958 parameters, each K in a fresh process: decode K
SubmitUpdate streams as the gateway does, turn them into Flower reply messages (DeviceGrid),
aggregate them with Flower's FedAvg, and bake the result into the next .mlmodel (ModelStore).
Twice: holding every update until the round closes (Flower's FedAvg over K replies carrying
arrays), and folding each into the round's mean as it arrives (MeanOnArrival, the default for the
FedAvg family: K replies carrying only metrics). Prints wall time per stage and the
process's peak resident memory against its baseline (the same process before the updates).

    python bench/aggregation_cost.py [--counts 10 100 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(count: int, mode: str = "hold") -> dict:
    from dataclasses import replace

    import numpy as np
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedcoreml.ios_bridge.default_model import build_default_model
    from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
    from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, decode_update, encode_update
    from fedcoreml.server.device_grid import (
        DeviceGrid,
        arrays_to_parameters,
        parameters_to_arrays,
    )
    from fedcoreml.server.flower_identity import set_task_identity
    from fedcoreml.server.gateway.task_board import Task, UpdateResult
    from fedcoreml.server.mean_on_arrival import MeanOnArrival
    from fedcoreml.server.model_store import ModelStore
    from fedcoreml.server.streaming_mean import StreamingWeightedMean

    class OneNodeFeed:
        """The UpdateFeed side of DeviceGrid for one round, without a gateway."""

        aggregator: StreamingWeightedMean

        def get_node_ids(self) -> list[int]:
            return [1]

        def fold_train_updates(self, server_round: int, aggregator) -> None:
            self.aggregator = aggregator

    spec = build_default_model(seed=0)
    infos = parameter_infos(spec)
    store = ModelStore(spec, "reference model")
    set_task_identity(1)
    base = get_parameters(spec)
    # One encoded update, decoded K times: what the gateway does per device.
    rng = np.random.default_rng(0)
    update = [(n, v + rng.standard_normal(v.shape).astype(np.float32) * 0.01) for n, v in base]
    wire = [m.SerializeToString() for m in encode_update(UpdateHeader("s", "t", 100, 0.1, 0.9, 1),
                                                         update)]  # fmt: skip
    from fedcoreml.ios_bridge.wire import device_pb2

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grid = DeviceGrid.__new__(DeviceGrid)  # only its message translation is used here
    instruction = Message(RecordDict({"config": ConfigRecord()}), 1, "train")
    instruction.metadata.__dict__["_message_id"] = "m"

    strategy = FedAvg()
    mean = None
    if mode == "stream":  # the strategy gives the round's aggregator to the grid
        strategy = MeanOnArrival(min_train_nodes=1, min_available_nodes=1)
        feed = OneNodeFeed()
        strategy.configure_train(1, parameters_to_arrays(base), ConfigRecord(), feed)
        mean = feed.aggregator

    start = time.perf_counter()
    replies = []
    for i in range(count):
        _, params = decode_update((device_pb2.UpdateChunk.FromString(b) for b in wire), infos)
        result = UpdateResult(params, 100 + i, 0.1, 0.9, 1.0)
        if mean is not None:  # as the task board does when it accepts an update
            mean.reserve()
            mean.add(result)
            result = replace(result, parameters=[])
        task = Task(f"t{i}", 1, "train", 1, None, None, 0.0, status="submitted", result=result,
                    aggregator=mean)  # fmt: skip
        replies.append(grid._reply(instruction, task))
    decode_s = time.perf_counter() - start

    start = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    aggregate_s = time.perf_counter() - start

    start = time.perf_counter()
    store.build(arrays_to_parameters(arrays), version=1)
    build_s = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "count": count,
        "decode_s": decode_s,
        "aggregate_s": aggregate_s,
        "build_s": build_s,
        "peak_mib": peak_rss / 1024,
        "baseline_mib": baseline_rss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="hold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.mode)))
        return
    modes = (
        ("hold", "every update held until the round closes (--hold-updates)"),
        ("stream", "mean on arrival (the default for the FedAvg family)"),
    )
    for mode, title in modes:
        print(f"\n{title}")
        table(args.counts, mode)


def table(counts: list[int], mode: str) -> None:
    stage = "decode+fold" if mode == "stream" else "decode s"
    print(f"{'K':>6} {stage:>11} {'FedAvg s':>9} {'.mlmodel s':>10} {'total s':>8} "
          f"{'peak MiB':>9} {'+MiB over base':>15} {'MiB/update':>11}")  # fmt: skip
    for count in counts:
        out = subprocess.run([sys.executable, __file__, "--one", str(count), "--mode", mode],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = r["peak_mib"] - r["baseline_mib"]
        total = r["decode_s"] + r["aggregate_s"] + r["build_s"]
        times = f"{r['decode_s']:>11.2f} {r['aggregate_s']:>9.2f} {r['build_s']:>10.3f}"
        memory = f"{r['peak_mib']:>9.0f} {extra:>15.0f} {extra / count:>11.2f}"
        print(f"{count:>6} {times} {total:>8.2f} {memory}")


if __name__ == "__main__":
    main()
