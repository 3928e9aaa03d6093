"""A run secured the way an operator does it: TLS, per-device tokens, real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from fedcoreml.server.gateway.tls import generate_test_ca

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli"]


def test_server_refuses_to_start_without_tls_or_insecure(tmp_path):
    result = subprocess.run(
        [*CLI, "server", "--run-dir", str(tmp_path), "--min-devices", "1", "--rounds", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "give --tls-cert and --tls-key, or --insecure" in result.stderr


def test_tls_and_tokens_end_to_end(tmp_path):
    certs = generate_test_ca(tmp_path / "certs")
    run_dir, token_file = tmp_path / "run", tmp_path / "tokens.json"
    created = subprocess.run(
        [*CLI, "tokens", "create", "--run-dir", str(run_dir), "--count", "2",
         "--out", str(token_file)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secrets = json.loads(token_file.read_text())
    assert sorted(secrets) == ["sim-000", "sim-001"]
    assert not any(s in (run_dir / "tokens.json").read_text() for s in secrets.values())

    server = subprocess.Popen(
        [*CLI, "server", "--listen", "127.0.0.1:0", "--run-dir", str(run_dir),
         "--min-devices", "2", "--rounds", "1", "--local-epochs", "1", "--batch-size", "32",
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
         "--require-tokens"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        port, lines = None, []
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            lines.append(server.stdout.readline())
            match = re.search(
                r"listening for devices on port (\d+) \(TLS, device tokens", lines[-1]
            )
            port = int(match.group(1)) if match else None
        assert port, "".join(lines)
        address = f"127.0.0.1:{port}"
        # a device without a token is turned away
        stranger = subprocess.run(
            [*CLI, "devices", "--server", address, "--count", "1", "--ca-cert",
             str(certs.ca_cert), "--device-prefix", "stranger", "--give-up-after", "20"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert stranger.returncode != 0
        assert "UNAUTHENTICATED" in stranger.stdout + stranger.stderr
        fleet = subprocess.run(
            [*CLI, "devices", "--server", address, "--count", "2", "--ca-cert",
             str(certs.ca_cert), "--token-file", str(token_file)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert fleet.returncode == 0, fleet.stdout + fleet.stderr
        rest, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, "".join(lines) + rest
    assert (run_dir / "final.mlmodel").exists()
    assert "INSECURE" not in "".join(lines) + rest
