"""Poisoned devices: well-formed updates the gateway must accept; only robust strategies resist."""

from __future__ import annotations

import numpy as np
import pytest
from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.client_sim.device import Poison
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import load_spec
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"


def test_poison_kinds():
    received = [("w", np.zeros((2, 2), np.float32))]
    trained = [("w", np.full((2, 2), 0.5, np.float32))]
    ((_, scaled),) = Poison.parse("scale:-10").apply(received, trained)
    np.testing.assert_array_equal(scaled, np.full((2, 2), -5.0, np.float32))
    ((_, noise),) = Poison.parse("random", seed=1).apply(received, trained)
    assert noise.shape == (2, 2) and noise.dtype == np.float32 and np.std(noise) > 0.1
    with pytest.raises(FedCoreMLError, match="expected 'scale:F'"):
        Poison.parse("scale:lots")


ROBUST_ARGS = {
    "krum": {"num_malicious_nodes": 2},
    "multikrum": {"num_malicious_nodes": 2, "num_nodes_to_select": 8},
    "dp-fixed": {"clipping_norm": 1.0},  # server-side update-norm clipping, no noise
}


@pytest.mark.parametrize(
    ("strategy", "robust"),
    [("fedavg", False), ("fedmedian", True), ("fedtrimmedavg", True), ("krum", True),
     ("multikrum", True), ("dp-fixed", True)],
)  # fmt: skip
def test_twenty_percent_poisoned_devices(tmp_path, strategy, robust):
    config = CoordinatorConfig(
        run_dir=tmp_path / "run", rounds=1, min_devices=10, round_timeout=30,
        poll_interval_ms=50, strategy=strategy, strategy_args=ROBUST_ARGS.get(strategy, {}),
    )  # fmt: skip
    coordinator = Coordinator(config)
    port = coordinator.start()
    honest = [ScriptedDevice(f"127.0.0.1:{port}", f"ok-{i}", 100, 0.001 * (i % 3 + 1))
              for i in range(8)]  # fmt: skip
    poisoned = [ScriptedDevice(f"127.0.0.1:{port}", f"bad-{i}", 100, 50.0) for i in range(2)]
    stop, threads = start_devices(honest + poisoned)
    run_to_the_end(coordinator, stop, threads)
    r0 = dict(get_parameters(load_spec(tmp_path / "run" / "models" / "round-0000.mlmodel")))
    r1 = dict(get_parameters(load_spec(tmp_path / "run" / "models" / "round-0001.mlmodel")))
    moved = max(float(np.abs(r1[n] - r0[n]).max()) for n in r0)
    if robust:
        assert moved < 0.01  # the honest devices' consensus, give or take
    else:
        assert moved > 5  # FedAvg is dragged by 20 % x 50 = 10
