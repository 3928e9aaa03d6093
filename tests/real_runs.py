"""Real run directories for the run view, report and predict tests.

``scripted_run``: a real coordinator over gRPC on 127.0.0.1 with scripted devices (no
TensorFlow), about a second; ``delay_s`` slows each device's submission so a test can read the
directory while the run goes on. ``trained_run``: ``fedcoreml demo`` with simulated iPhones that
train with TensorFlow (slow), whose model has learned.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig


def scripted_config(run_dir: Path, rounds: int, min_devices: int) -> CoordinatorConfig:
    return CoordinatorConfig(
        run_dir=run_dir,
        rounds=rounds,
        min_devices=min_devices,
        round_timeout=30,
        session_ttl=3,
        poll_interval_ms=50,
        fraction_evaluate=1.0,
    )


def scripted_run(run_dir: Path, rounds: int = 2, devices: int = 2, delay_s: float = 0.0) -> Path:
    """A finished run of ``rounds`` rounds with ``devices`` scripted devices."""
    coordinator = Coordinator(scripted_config(run_dir, rounds, devices))
    port = coordinator.start()
    phones = [
        ScriptedDevice(
            f"127.0.0.1:{port}", f"phone-{i}", 100 * (i + 1), 0.001 * (i + 1), delay_s=delay_s
        )
        for i in range(devices)
    ]
    stop, threads = start_devices(phones)
    deadline = time.monotonic() + 30
    while len(coordinator.registry.live_node_ids()) < devices:
        assert time.monotonic() < deadline, "the devices did not all register"
        time.sleep(0.02)
    run_to_the_end(coordinator, stop, threads)
    for phone in phones:
        assert phone.error is None, phone.error
    return run_dir


def trained_run(run_dir: Path, devices: int = 2, rounds: int = 2) -> Path:
    """``fedcoreml demo``: a coordinator and simulated iPhones that train (TensorFlow; slow)."""
    result = subprocess.run(
        [sys.executable, "-m", "fedcoreml.server.cli", "demo", "--devices", str(devices),
         "--rounds", str(rounds), "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir
