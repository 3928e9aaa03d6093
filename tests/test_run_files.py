"""Files the coordinator writes: modes, durability, and a run directory that never mixes runs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fedcoreml.ios_bridge import atomic_file
from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic, write_text_atomic
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.ios_bridge.token_file import write_token_file
from fedcoreml.server.gateway.tls import generate_test_ca
from fedcoreml.server.gateway.tokens import TokenStore
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask():
    """A umask that would make files private: the modes asked for must still hold."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def test_atomic_writes_are_world_readable_unless_secret(tmp_path, strict_umask):
    public = write_text_atomic(tmp_path / "a.json", "{}")
    secret = write_bytes_atomic(tmp_path / "key.pem", b"k", mode=0o600)
    assert mode(public) == 0o644 and public.read_text() == "{}"
    assert mode(secret) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    monkeypatch.setattr(atomic_file.os, "replace", replace)
    monkeypatch.setattr(atomic_file.os, "fsync", fsync)
    write_bytes_atomic(tmp_path / "m.mlmodel", b"model")
    assert events == ["fsync file", "replace", "fsync dir"]


def test_secrets_stay_private(tmp_path):
    paths = generate_test_ca(tmp_path / "certs")
    assert mode(paths.ca_key) == 0o600 and mode(paths.server_key) == 0o600
    assert mode(paths.ca_cert) == 0o644 and mode(paths.server_cert) == 0o644
    assert mode(write_token_file(tmp_path / "tokens.out", {"sim-000": "fcm_x"})) == 0o600
    store = TokenStore(tmp_path / "run")
    store.create("sim-000")
    assert mode(tmp_path / "run" / "tokens.json") == 0o600


def test_opening_a_run_directory_creates_nothing(tmp_path):
    directory = RunDirectory(tmp_path / "absent")
    with pytest.raises(RunDirectoryError, match="absent: no such run directory"):
        directory.read_config()
    assert not (tmp_path / "absent").exists()


def test_a_new_run_creates_world_readable_folders(tmp_path, strict_umask):
    directory = RunDirectory(tmp_path / "runs" / "a")
    directory.check_new()
    assert not directory.path.exists()
    directory.write_config({"run_id": 1})
    directory.write_round_model(0, b"model")
    assert mode(directory.path) == 0o755 and mode(directory.models) == 0o755
    assert mode(directory.config_file) == 0o644 and mode(directory.round_model(0)) == 0o644


def test_a_directory_holding_a_run_is_refused_for_a_new_one(tmp_path):
    first = RunDirectory(tmp_path / "run")
    first.write_config({"run_id": 1})
    first.write_round_model(0, b"model")
    first.append_metrics({"round": 0, "model_sha256": sha256_hex(b"model")})
    for attempt in (first.check_new, lambda: first.write_config({"run_id": 2})):
        with pytest.raises(RunDirectoryError) as refused:
            attempt()
        message = str(refused.value)
        assert "already holds a run" in message and f"--resume {first.path}" in message
    assert json.loads(first.config_file.read_text()) == {"run_id": 1}
    assert len(first.read_metrics()) == 1


def test_run_json_alone_is_a_run_but_its_own_run_may_restart(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"run_id": 7})
    # Stopped before round 0 was recorded, then resumed: the same run writes its config again.
    directory.write_config({"run_id": 7, "rounds": 3})
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(run.json\)"):
        directory.write_config({"run_id": 8})


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="file: not a directory"):
        RunDirectory(tmp_path / "file").check_new()


def test_an_unreadable_run_json_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirectoryError, match=r"run\.json: not valid JSON"):
        RunDirectory(tmp_path).read_config()
