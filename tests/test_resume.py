"""Crash and resume with real processes: kill -9 the coordinator mid-run, twice, and resume it."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def commits(run_dir: Path) -> dict[int, str]:
    """Committed rounds (model file and commit record durable) and their models' sha256."""
    return {c["round"]: c["model_sha256"] for c in metrics(run_dir, "commits.jsonl")}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_server(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "server", *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def test_kill_9_twice_and_resume(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = start_server(
        ["--insecure", "--listen", address, "--run-dir", str(run_dir), "--min-devices", "3",
         "--rounds", "4",
         "--local-epochs", "1", "--batch-size", "32", "--lr", "0.001", "--round-timeout", "60",
         "--session-ttl", "5"], log)  # fmt: skip
    devices = subprocess.Popen(
        [*CLI, "devices", "--server", address, "--count", "3", "--give-up-after", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # 1: kill while round 2 is being trained (round 1 just judged)
        wait_for(lambda: len(metrics(run_dir)) >= 2, 120, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait()
        committed = commits(run_dir)
        first_stop = max(committed)

        # 2: resume; kill the moment round 3's model file appears (perhaps committed, not judged)
        server = start_server(["--resume", str(run_dir)], log)
        round3 = run_dir / "models" / "round-0003.mlmodel"
        wait_for(round3.exists, 120, "round 3's model file")
        server.send_signal(signal.SIGKILL)
        server.wait()
        second_stop = max(commits(run_dir))

        # 3: resume again and let it finish
        server = start_server(["--resume", str(run_dir)], log)
        assert server.wait(timeout=180) == 0, log.read_text()[-3000:]
        out, _ = devices.communicate(timeout=120)
        assert devices.returncode == 0, out
    finally:
        for process in (server, devices):
            if process.poll() is None:
                process.kill()

    text = log.read_text()
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2, 3, 4]  # nothing lost, nothing twice
    for line in lines:  # every recorded model is complete and is the one recorded
        data = (run_dir / "models" / f"round-{line['round']:04d}.mlmodel").read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["model_sha256"]
    assert commits(run_dir) == {m["round"]: m["model_sha256"] for m in lines}
    assert committed[first_stop] == lines[first_stop]["model_sha256"]  # committed rounds kept
    assert (run_dir / "final.mlmodel").read_bytes() == (
        run_dir / "models" / "round-0004.mlmodel"
    ).read_bytes()
    # each restart continued from the last committed model, bit for bit
    resumed = re.findall(r"resuming run \d+ after round (\d+) of 4 \(global model sha256 (\w+)\)",
                         text)  # fmt: skip
    assert [int(r) for r, _ in resumed] == [first_stop, second_stop]
    for round_number, sha in resumed:
        assert sha == lines[int(round_number)]["model_sha256"]
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file left behind
    assert all(m["devices_reported"] == 3 for m in lines[1:])  # the fleet came back by itself
    assert "finished" in out
