"""Stopping the coordinator: SIGTERM or Ctrl-C says after which round, and how to continue."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.server.run_dir import RunDirectory
from fedcoreml.server.server_cli import _stopped
from fedcoreml.server.stop_signals import StopRequested, stop_signals


def test_a_signal_inside_raises_stop_requested_and_handlers_come_back():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(StopRequested) as stopped, stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # woken at once by the signal
    assert stopped.value.exit_code == 143 and stopped.value.name == "SIGTERM"
    assert {signum: signal.getsignal(signum) for signum in before} == before


def committed_run(path, rounds: int) -> RunDirectory:
    directory = RunDirectory(path)
    directory.write_config({"run_id": 1})
    for round_number in range(rounds + 1):
        data = f"model {round_number}".encode()
        directory.write_round_model(round_number, data)
        directory.append_metrics({"round": round_number, "model_sha256": sha256_hex(data)})
    return directory


def stop_line(
    run_dir, listen=None, linger=False, rounds=5, signum=signal.SIGTERM, asynchronous=False
) -> str:
    args = argparse.Namespace(listen=listen, linger=linger)
    config = SimpleNamespace(run_dir=run_dir, rounds=rounds, asynchronous=asynchronous)
    coordinator = SimpleNamespace(config=config)
    return _stopped(args, coordinator, StopRequested(signum))


def test_the_stop_line_names_the_last_committed_round_and_the_exact_command(tmp_path):
    run_dir = committed_run(tmp_path / "my runs" / "a", rounds=2).path
    # A round whose model was written but whose metrics line was not is not committed.
    RunDirectory(run_dir).write_round_model(3, b"half a round")
    assert stop_line(run_dir, listen="0.0.0.0:50051", linger=True) == (
        "stopped by SIGTERM after round 2 of 5; continue with: fedcoreml server --resume "
        f"'{run_dir}' --listen 0.0.0.0:50051 --linger"
    )
    assert stop_line(run_dir, signum=signal.SIGINT).startswith(
        "stopped by Ctrl-C (SIGINT) after round 2 of 5; continue with: fedcoreml server --resume"
    )
    assert stop_line(run_dir, asynchronous=True).startswith("stopped by SIGTERM after version 2")


def test_the_stop_line_before_any_round(tmp_path):
    assert stop_line(tmp_path / "none") == (
        "stopped by SIGTERM before the run started; nothing was recorded"
    )
    started = committed_run(tmp_path / "started", rounds=0).path
    assert stop_line(started) == (
        "stopped by SIGTERM before round 1 of 5 completed; continue with: fedcoreml server "
        f"--resume {started}"
    )


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "exit_code", "name"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C (SIGINT)")],
)
def test_a_waiting_coordinator_stops_on_a_signal(tmp_path, signum, exit_code, name):
    run_dir = tmp_path / "run"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedcoreml.server.cli", "server", "--insecure",
         "--listen", "127.0.0.1:0", "--run-dir", str(run_dir), "--rounds", "2",
         "--min-devices", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "FORCE_COLOR"},
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(server.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Waiting for nodes to connect" in line for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)
            seen.append(line)
        time.sleep(3.5)  # Flower says it again every second
        server.send_signal(signum)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    log = "".join(seen)
    assert server.returncode == exit_code, log
    assert seen[-1] == (
        f"fedcoreml server: stopped by {name} before round 1 of 2 completed; continue with: "
        f"fedcoreml server --resume {run_dir} --listen 127.0.0.1:0\n"
    )
    assert "Traceback" not in log and "\x1b[" not in log + server.stdout.read()
    assert log.count("Waiting for nodes to connect") == 1
    assert log.count("INSECURE") == 1
    assert mode(run_dir) == 0o755 and mode(run_dir / "models") == 0o755
    assert mode(run_dir / "run.json") == 0o644
