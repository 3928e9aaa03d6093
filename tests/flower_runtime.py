"""Flower's runtimes for tests: a SuperLink (simulation or deployment), SuperNodes, `flwr run`.

Every process runs with its own FLWR_HOME under the test's temporary directory, on ports chosen
at run time, with runtime dependency installation off (no network). ``FlowerRuntime.close``
stops them all, including the processes they started (Ray, ClientApps), found by FLWR_HOME.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlowerRuntime:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        scripts = str(Path(sys.executable).parent)  # flower-superlink, flwr-simulation, ...
        self.env = {
            **os.environ,
            "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def start_superlink(self, simulation: bool) -> None:
        command = [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            # a file: the in-memory database fails concurrent pushes ("SQL statements in
            # progress") in flwr 1.42
            "--database", str(self.root / "state.db"), "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if simulation:
            command += ["--simulation", "--isolation", "subprocess"]
        self._start("superlink", command)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the SuperLink did not start:\n" + self.log("superlink"))

    def start_supernode(self, index: int, count: int) -> None:
        self._start(f"supernode-{index}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", f"partition-id={index} num-partitions={count}",
        ])  # fmt: skip

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], cwd=REPO, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def run_app(self, run_config: str, federation_config: str | None = None) -> int:
        """``flwr run .`` with the app in this repository; returns the run id."""
        args = ["run", ".", "test", "--format", "json", "--run-config", run_config]
        if federation_config:
            args += ["--federation-config", federation_config]
        result = self.flwr(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return int(json.loads(result.stdout)["run-id"])

    def wait(self, run_id: int, timeout: float) -> tuple[str, str]:
        """The run's final (status, details), polling `flwr ls` as an operator would."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = self.flwr("ls", "test", "--run-id", str(run_id), "--format", "json")
            if listed.returncode == 0:
                run = json.loads(listed.stdout)["runs"][0]
                if run["status"].startswith("finished"):
                    return run["status"], run.get("status-details", "")
            time.sleep(2)
        raise TimeoutError(f"run {run_id} did not finish in {timeout} s:\n{self.log('superlink')}")

    def run_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), "test", "--show", timeout=60).stdout

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Processes started with this FLWR_HOME that left the process groups (Ray's)."""
        marker = f"FLWR_HOME={self.home}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
