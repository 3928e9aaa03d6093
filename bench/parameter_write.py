"""Benchmark: writing a new global model's parameters into the spec and serialising it.

This is on the coordinator's per-round path: after aggregation, the 585,958 averaged values go
into the .mlmodel that every device downloads next. Baseline, measured in the same run: the
naive way, assigning each array element by element into the protobuf repeated field.

    python bench/parameter_write.py [--repeats 20]

Target: <= 50 ms per write + serialise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos, set_parameters


def naive_write(spec, parameters) -> None:
    layers = {layer.name: layer for layer in spec.neuralNetwork.layers}
    for name, value in parameters:
        layer_name, field = name.rsplit(".", 1)
        raw = layers[layer_name]
        getattr(getattr(raw, raw.WhichOneof("layer")), field).floatValue[:] = value.ravel()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    spec = build_default_model(seed=0)
    infos = parameter_infos(spec)
    rng = np.random.default_rng(0)
    new = [(n, rng.standard_normal(v.shape).astype(np.float32)) for n, v in get_parameters(spec)]

    serialise = timed(lambda: spec_to_bytes(spec), args.repeats)

    def write_ours() -> None:
        set_parameters(spec, new, infos=infos)
        spec_to_bytes(spec)

    ours = timed(write_ours, args.repeats)
    naive = timed(lambda: (naive_write(spec, new), spec_to_bytes(spec)), max(3, args.repeats // 4))
    read = timed(lambda: get_parameters(spec), args.repeats)
    print(f"parameters: {sum(i.size for i in infos):,} float32 values")
    print(f"serialise only:                     {serialise * 1e3:7.2f} ms")
    print(f"naive element-wise write + serialise: {naive * 1e3:7.2f} ms")
    print(f"fedcoreml write + serialise:        {ours * 1e3:7.2f} ms  (target <= 50 ms)")
    print(f"fedcoreml read:                     {read * 1e3:7.2f} ms")
    print(f"ratio fedcoreml / naive: {ours / naive:.3f}")


if __name__ == "__main__":
    main()
