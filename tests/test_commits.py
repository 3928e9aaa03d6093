"""Commit before publish: the run directory's commit records, and a coordinator that names a
model version to a device only once it is durable (the kill -9 matrix: test_crash_points.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import model_zoo
import pytest
from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.ios_bridge.mlmodel_io import sha256_hex, spec_to_bytes
from fedcoreml.server import crash_points
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
from fedcoreml.server.federated_run import FederatedRun
from fedcoreml.server.gateway.task_board import RoundModel
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError

# -- the run directory --------------------------------------------------------------------------


def commit(directory: RunDirectory, round_number: int, data: bytes) -> None:
    directory.write_round_model(round_number, data)
    directory.append_commit({"round": round_number, "model_sha256": sha256_hex(data)})


def judged(directory: RunDirectory, round_number: int, data: bytes) -> None:
    directory.append_metrics({"round": round_number, "model_sha256": sha256_hex(data)})


@pytest.fixture
def run(tmp_path) -> RunDirectory:
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"run_id": 1})
    return directory


def test_a_round_is_committed_by_its_record_and_judged_by_its_metrics_line(run):
    commit(run, 0, b"m0")
    commit(run, 1, b"m1")
    judged(run, 0, b"m0")
    run.write_round_model(2, b"written, never committed: never shown to a device")
    assert run.last_committed_round() == 1
    assert [c["round"] for c in run.unjudged()] == [1]
    judged(run, 1, b"m1")
    assert run.unjudged() == []


def test_nothing_committed_before_round_zero_s_record(run):
    run.write_round_model(0, b"m0")
    assert run.last_committed_round() is None
    run.write_config({"run_id": 1, "again": True})  # the same run may still start over


def test_a_committed_run_is_not_restarted_as_a_new_one(run):
    commit(run, 0, b"m0")
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(run.json\)"):
        run.write_config({"run_id": 1})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.round_model(1).write_bytes(b"bit rot"),
         r"round-0001.mlmodel: sha256 \w+\.\.\. differs from the \w+\.\.\. recorded in commits"),
        (lambda r: r.round_model(1).unlink(),
         r"round-0001.mlmodel: missing, but commits.jsonl records round 1"),
        (lambda r: commit(r, 3, b"m3"), r"commits.jsonl: round 3 where round 2 was expected"),
        (lambda r: judged(r, 1, b"another model"),
         r"metrics.jsonl: round 1 names model \w+\.\.\. but commits.jsonl committed \w+\.\.\."),
        (lambda r: judged(r, 2, b"m2"), r"metrics.jsonl: round 2 was never committed"),
        (lambda r: r.commits_file.write_text("{torn"), r"commits.jsonl: not valid JSON lines"),
    ],
    ids=["changed-file", "missing-file", "gap", "metrics-disagree", "metrics-ahead", "not-json"],
)  # fmt: skip
def test_a_damaged_run_directory_is_refused_naming_the_file(run, damage, message):
    commit(run, 0, b"m0")
    commit(run, 1, b"m1")
    judged(run, 0, b"m0")
    damage(run)
    with pytest.raises(RunDirectoryError, match=message):
        run.last_committed_round()


def test_temporary_files_of_interrupted_writes_are_removed(run):
    commit(run, 0, b"m0")
    stray = [run.path / ".commits.jsonl.abc.tmp", run.models / ".round-0001.mlmodel.xyz.tmp"]
    for path in stray:
        path.write_bytes(b"half")
    assert sorted(run.remove_leftovers()) == sorted(stray)
    assert not any(path.exists() for path in stray) and run.last_committed_round() == 0


def test_a_run_recorded_before_commit_records_counts_its_metrics_lines(run):
    for round_number in (0, 1):
        data = f"m{round_number}".encode()
        run.write_round_model(round_number, data)
        judged(run, round_number, data)
    assert run.last_committed_round() == 1 and run.unjudged() == []
    commit(run, 2, b"m2")  # resumed by this build: its commit records start at round 0
    assert [c["round"] for c in run.read_commits()] == [0, 1, 2]
    assert run.last_committed_round() == 2 and [c["round"] for c in run.unjudged()] == [2]


# -- the fault-injection switch -----------------------------------------------------------------


def test_crash_point_settings_are_parsed_or_refused_in_one_line():
    assert crash_points.parse("after-commit:2") == crash_points.CrashAt("after-commit", 2)
    for bad in ("after-commit", "after-commit:two", "after-lunch:1", ":3"):
        with pytest.raises(crash_points.CrashPointError) as refused:
            crash_points.parse(bad)
        assert f"FEDCOREML_CRASH_AT={bad!r}: expected POINT:ROUND" in str(refused.value)
        assert "after-run-finished" in str(refused.value) and "\n" not in str(refused.value)


def test_the_switch_is_off_by_default_and_kills_only_at_its_point():
    code = (
        "from fedcoreml.server import crash_points as c\n"
        "c.reached('after-commit', 1); c.reached('after-model-file', 2)\n"
        "print('alive', flush=True); c.reached('after-commit', 2); print('never')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != crash_points.ENV}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert off.returncode == 0 and off.stdout == "alive\nnever\n"
    env[crash_points.ENV] = "after-commit:2"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert on.returncode == -9 and on.stdout == "alive\n"
    assert "FEDCOREML_CRASH_AT: crash point after-commit:2 reached" in on.stderr


# -- the coordinator ----------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.mlmodel"
    path.write_bytes(spec_to_bytes(model_zoo.handwritten_cnn()))
    return path


def test_a_committed_version_is_never_published_as_another_model(tmp_path, tiny_model):
    federated = FederatedRun(CoordinatorConfig(run_dir=tmp_path / "run", rounds=1, min_devices=1,
                                               model=tiny_model))  # fmt: skip
    federated.run_dir.write_config({"run_id": federated.run_id})
    first, other = RoundModel.from_bytes(0, b"first"), RoundModel.from_bytes(0, b"other")
    federated.publish(first)
    federated.publish(first)  # again: nothing to do
    with pytest.raises(RunDirectoryError, match="model version 0 is committed as sha256"):
        federated.publish(other)
    assert [c["round"] for c in federated.run_dir.read_commits()] == [0]
    assert federated.run_dir.round_model(0).read_bytes() == b"first"


def test_every_task_names_a_committed_model_and_resume_judges_what_was_not(tmp_path, tiny_model):
    """Evaluate tasks ship round r's model before Flower's evaluate_fn sees it: still committed."""
    run_dir = tmp_path / "run"
    config = CoordinatorConfig(run_dir=run_dir, rounds=2, min_devices=2, fraction_evaluate=1.0,
                               model=tiny_model, round_timeout=30, session_ttl=1,
                               poll_interval_ms=50)  # fmt: skip
    seen: list[tuple[str, int, bool]] = []

    def check(kind):
        def hook(_client, task, _parameters):
            commits = RunDirectory(run_dir).read_commits()
            sha = {c["round"]: c["model_sha256"] for c in commits}.get(task.model.version)
            seen.append((kind, task.model.version, sha == task.model.sha256))

        return hook

    coordinator = Coordinator(config)
    port = coordinator.start()
    devices = [ScriptedDevice(f"127.0.0.1:{port}", f"phone-{i}", 100 * (i + 1), 0.01 * (i + 1),
                              before_submit=check("train"), before_evaluation=check("evaluate"))
               for i in range(2)]  # fmt: skip
    stop, threads = start_devices(devices)
    run_to_the_end(coordinator, stop, threads)
    assert all(d.error is None and d.finished for d in devices)
    assert sorted(seen) == sorted(
        [("train", 0, True), ("train", 1, True), ("evaluate", 1, True), ("evaluate", 2, True)] * 2
    )
    directory = RunDirectory(run_dir)
    lines = directory.metrics_file.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[2])["evaluated_devices"] == 2

    # Killed after round 2's commit, before its judging: resumed, it judges round 2 and finishes.
    directory.metrics_file.write_text("".join(line + "\n" for line in lines[:2]))
    directory.final_model.unlink()
    resumed = Coordinator.resume(run_dir)
    started = time.monotonic()
    resumed.run()  # no device comes back: it waits a session TTL for them, then stops
    resumed.stop()
    assert time.monotonic() - started < 10
    again = [json.loads(line) for line in directory.metrics_file.read_text().splitlines()]
    assert again[:2] == [json.loads(line) for line in lines[:2]]
    # Judged now from its commit record: the same line, but for what came after the commit
    # (round 2 was committed when its evaluate tasks were handed out, before they were answered).
    after_commit = {"evaluated_devices", "device_accuracy", "seconds"}
    original = json.loads(lines[2])
    assert {k: v for k, v in again[2].items() if k not in after_commit} == {
        k: v for k, v in original.items() if k not in after_commit
    }
    assert again[2]["evaluated_devices"] == 0 and again[2]["device_accuracy"] is None
    assert directory.final_model.read_bytes() == directory.round_model(2).read_bytes()
