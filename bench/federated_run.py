"""Shared by the federated benchmarks: one real federated run, and its in-process twin.

``federated`` runs the coordinator in this process and ``fedcoreml devices`` as a separate
process on 127.0.0.1 (exactly what ``fedcoreml demo`` does). ``direct`` does the same local
training with the Core ML emulator in this process, device after device, and averages with the
examples-weighted mean: no protocol, no server, no model files.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class FederatedRun:
    rounds_wall_s: float  # from the first task sent to the end of the last round
    total_wall_s: float  # including waiting for the fleet process to start
    accuracy: float  # server-side, reference interpreter, on the test set
    records: list


def federated(
    data_dir: str | None, devices: int, rounds: int, partition: str, batch: int, lr: float,
    seed: int = 0, eval_data: str | None = None, local_epochs: int = 1, fraction: float = 1.0,
    strategy: str = "fedavg", strategy_args: dict | None = None, fleet_args: tuple = (),
) -> FederatedRun:  # fmt: skip
    from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig

    with tempfile.TemporaryDirectory() as tmp:
        config = CoordinatorConfig(
            run_dir=Path(tmp) / "run", rounds=rounds, min_devices=devices,
            listen="127.0.0.1:0", local_epochs=local_epochs, batch_size=batch, learning_rate=lr,
            eval_data=eval_data or data_dir, poll_interval_ms=100, model_seed=seed,
            fraction=fraction, strategy=strategy, strategy_args=strategy_args or {},
        )  # fmt: skip
        coordinator = Coordinator(config)
        port = coordinator.start()
        command = [sys.executable, "-m", "fedcoreml.server.cli", "devices", "--server",
                   f"127.0.0.1:{port}", "--count", str(devices), "--partition", partition,
                   "--seed", str(seed), *fleet_args]  # fmt: skip
        if data_dir:
            command += ["--data-dir", data_dir]
        fleet = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        try:
            coordinator.run()
        finally:
            end = time.time()
            coordinator.stop()
            fleet.wait(timeout=120)
        first_task = min(s.started_at for s in coordinator.grid.history)
        return FederatedRun(
            rounds_wall_s=end - first_task,
            total_wall_s=end - start,
            accuracy=coordinator.records[-1].test_accuracy,
            records=coordinator.records,
        )


def direct(
    data_dir: str | None, devices: int, rounds: int, partition: str, batch: int, lr: float,
    seed: int = 0, local_epochs: int = 1,
) -> tuple[float, float]:  # fmt: skip
    """(wall seconds, final test accuracy) of the same training without federation."""
    from fedcoreml.client_sim.emulator import CoreMLEmulator
    from fedcoreml.client_sim.fleet import partition_dataset, tune_garbage_collection
    from fedcoreml.ios_bridge.datasets import load_dataset
    from fedcoreml.ios_bridge.default_model import build_default_model
    from fedcoreml.ios_bridge.parameters import get_parameters

    tune_garbage_collection()  # as the fleet process does, so both sides run alike
    data = load_dataset(data_dir)
    shares = partition_dataset(data, devices, partition, seed)
    spec = build_default_model(seed=seed)
    global_params = get_parameters(spec)
    emulators: list[CoreMLEmulator | None] = [None] * devices
    start = time.perf_counter()
    for _ in range(rounds):
        results = []
        for i, share in enumerate(shares):
            if emulators[i] is None:
                emulators[i] = CoreMLEmulator(spec, f"device {i}")
            emulator = emulators[i]
            emulator.set_parameters(global_params)
            result = emulator.train(
                share.x_train, share.y_train, epochs=local_epochs, batch_size=batch,
                learning_rate=lr, seed=i,
            )  # fmt: skip
            results.append(result)
        total = sum(r.num_examples for r in results)
        global_params = [
            (name, sum(dict(r.parameters)[name] * (r.num_examples / total) for r in results)
             .astype(np.float32))
            for name, _ in global_params
        ]  # fmt: skip
    seconds = time.perf_counter() - start
    emulators[0].set_parameters(global_params)
    _, accuracy = emulators[0].evaluate(data.x_test, data.y_test)
    return seconds, accuracy


def centralised(
    data_dir: str | None, devices: int, epochs: int, partition: str, batch: int, lr: float,
    seed: int = 0,
) -> float:  # fmt: skip
    """Test accuracy of one model trained on the union of the devices' training data."""
    from fedcoreml.client_sim.emulator import CoreMLEmulator
    from fedcoreml.client_sim.fleet import partition_dataset
    from fedcoreml.ios_bridge.datasets import load_dataset
    from fedcoreml.ios_bridge.default_model import build_default_model

    data = load_dataset(data_dir)
    shares = partition_dataset(data, devices, partition, seed)
    x = np.concatenate([s.x_train for s in shares])
    y = np.concatenate([s.y_train for s in shares])
    emulator = CoreMLEmulator(build_default_model(seed=seed), "centralised")
    emulator.train(x, y, epochs=epochs, batch_size=batch, learning_rate=lr, seed=seed)
    return emulator.evaluate(data.x_test, data.y_test)[1]
