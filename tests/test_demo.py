"""The coordinator and the fleet as separate processes, the way an operator runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import load_spec

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli"]


def test_server_and_devices_processes(tmp_path):
    run_dir = tmp_path / "run"
    server = subprocess.Popen(
        [*CLI, "server", "--insecure", "--listen", "127.0.0.1:0", "--run-dir", str(run_dir),
         "--min-devices", "2", "--rounds", "2", "--local-epochs", "1", "--batch-size", "32",
         "--lr", "0.001", "--fraction-evaluate", "1", "--round-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 60
        lines = []
        while port is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            match = re.search(r"listening for devices on port (\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "".join(lines)
        devices = subprocess.run(
            [*CLI, "devices", "--server", f"127.0.0.1:{port}", "--count", "2", "--seed", "1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert devices.returncode == 0, devices.stdout + devices.stderr
        rest, _ = server.communicate(timeout=120)
        assert server.returncode == 0, "".join(lines) + rest
    finally:
        if server.poll() is None:
            server.kill()
    log = "".join(lines) + rest
    assert "round 2: test accuracy" in log and "run finished" in log
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["devices_reported"] == 2 and m["evaluated_devices"] == 2 for m in metrics[1:])
    assert metrics[2]["test_accuracy"] > metrics[0]["test_accuracy"]
    # the recorded accuracy is what the final file scores under the reference interpreter
    from fedcoreml.ios_bridge.datasets import load_bundled_sample

    data = load_bundled_sample()
    _, accuracy = ReferenceInterpreter(load_spec(run_dir / "final.mlmodel")).evaluate(
        data.x_test, data.y_test
    )
    assert round(accuracy, 6) == metrics[2]["test_accuracy"]
    assert "finished" in devices.stdout


def test_demo(tmp_path):
    result = subprocess.run(
        [*CLI, "demo", "--devices", "3", "--rounds", "2", "--run-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 2/2: test accuracy" in result.stdout
    final = float(re.search(r"final test accuracy: ([0-9.]+)", result.stdout).group(1))
    assert final > 0.3
    assert (tmp_path / "demo" / "final.mlmodel").exists()
    assert "Traceback" not in result.stdout + result.stderr
