"""Dropouts: 30 % of the devices vanish mid-task in every round; the run still completes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"


def test_thirty_percent_of_devices_vanish_every_round(tmp_path):
    config = CoordinatorConfig(
        run_dir=tmp_path / "run", rounds=5, min_devices=10, min_reports=5, round_timeout=120,
        local_epochs=1, batch_size=32, learning_rate=1e-3, poll_interval_ms=100,
    )  # fmt: skip
    coordinator = Coordinator(config)
    port = coordinator.start()
    fleet = subprocess.Popen(
        [sys.executable, "-m", "fedcoreml.server.cli", "devices", "--server",
         f"127.0.0.1:{port}", "--count", "10", "--drop-each-round", "0.3",
         "--rejoin-after", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        coordinator.run()
    finally:
        coordinator.stop()
        out, _ = fleet.communicate(timeout=120)
    assert fleet.returncode == 0, out
    rounds = [r for r in coordinator.records if r.round > 0]
    assert [r.round for r in rounds] == [1, 2, 3, 4, 5]
    for record in rounds:
        assert record.devices_sampled == 10
        assert record.devices_reported == 7 and record.devices_failed == 3
    assert rounds[-1].test_accuracy > coordinator.records[0].test_accuracy
