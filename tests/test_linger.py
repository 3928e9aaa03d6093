"""`fedcoreml server --linger`: after the run, late devices still learn that it is finished."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from protocol_devices import ScriptedDevice

from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli", "server"]


def start(args: list[str]) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        lines.append(server.stdout.readline())
        match = re.search(r"listening for devices on port (\d+)", lines[-1])
        if match:
            return server, int(match.group(1))
    server.kill()
    raise AssertionError("".join(lines))


def wait_for_line(server: subprocess.Popen, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        assert line, "the coordinator exited"
        if pattern in line:
            return
    raise AssertionError(f"no line with {pattern!r}")


def late_device_hears_finished(port: int) -> device_pb2.RunFinished:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        session = stub.Register(device_pb2.RegisterRequest(device_id="late")).session_id
        reply = stub.GetTask(device_pb2.GetTaskRequest(session_id=session), timeout=10)
    assert reply.WhichOneof("task") == "finished"
    return reply.finished


def stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(timeout=20)


def test_a_lingering_coordinator_tells_late_devices_and_stops_on_sigterm(tmp_path):
    run_dir = tmp_path / "run"
    server, port = start(["--insecure", "--listen", "127.0.0.1:0", "--run-dir", str(run_dir),
                          "--rounds", "1", "--min-devices", "1", "--linger",
                          "--poll-interval-ms", "50"])  # fmt: skip
    try:
        device = ScriptedDevice(f"127.0.0.1:{port}", "phone", 100, 0.01)
        done = threading.Event()
        thread = threading.Thread(target=device.run, args=(done,), daemon=True)
        thread.start()
        wait_for_line(server, "still telling devices it is finished")
        assert device.finished and len(device.submissions) == 1
        final = late_device_hears_finished(port)
        digest = hashlib.sha256((run_dir / "final.mlmodel").read_bytes()).hexdigest()
        assert final.final_model.sha256 == digest and final.reason == "run complete"
        assert stop(server) == 0
        # restarted (a service manager, a pod): the finished run lingers again, not exits
        server, port = start(["--resume", str(run_dir), "--listen", "127.0.0.1:0", "--linger"])
        wait_for_line(server, "still telling devices it is finished")
        assert late_device_hears_finished(port).final_model.sha256 == digest
        assert stop(server) == 0
    finally:
        if server.poll() is None:
            server.kill()
