"""kill -9 at every crash point: a model version names one model, whatever is killed when.

A real ``fedcoreml server`` (a tiny model, 3 devices, 4 rounds) is sent SIGKILL by its own
fault-injection switch (``FEDCOREML_CRASH_AT``, server/crash_points.py) at a named point, resumed
with ``--resume`` on the same port, killed at the next point, and so on until the run finishes;
one device process (tests/crash_fleet.py: DeviceClient, recording everything) lives through all
of it. Three such chains cover the nine points. Each point's test checks what survived the kill;
each chain's test checks the finished run: every (version, sha256) a device was told names
exactly that version's model file, one metrics line per round, final.mlmodel = the last round's
model, each round's model the examples-weighted mean of the updates accepted by the coordinator
process that committed it, and devices that came back by themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import model_zoo
import numpy as np
import pytest

from fedcoreml.ios_bridge.mlmodel_io import load_spec, spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.server.crash_points import ENV, POINTS

pytestmark = pytest.mark.slow  # whole runs in real processes: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli"]
FLEET = Path(__file__).with_name("crash_fleet.py")
ROUNDS, DEVICES = 4, 3

# Each chain: the crash point of every coordinator process but the last, in the order they die,
# and whether the coordinators linger (needed to tell devices the run is finished after a kill
# past the last round).
CHAINS: dict[str, tuple[list[str], bool]] = {
    "publish": (["after-aggregate:1", "after-model-file:2", "after-commit:3"], False),
    "judge": (["after-handout:1", "mid-judging:2", "before-metrics:3"], False),
    "finish": (["after-metrics:1", f"after-final:{ROUNDS}", f"after-run-finished:{ROUNDS}"], True),
}
CHAIN_OF = {spec.split(":")[0]: name for name, (specs, _) in CHAINS.items() for spec in specs}
assert sorted(CHAIN_OF) == sorted(POINTS)  # every crash point is exercised
# An asynchronous run (FedBuff, with server momentum) killed at each point of a version's commit.
ASYNC_CHAIN = ["after-aggregate:1", "after-model-file:2", "after-commit:3"]
FEDBUFF = ["--strategy", "fedbuff", "--concurrency", str(DEVICES), "--buffer", "2",
           "--keep-updates", "--strategy-arg", "server_momentum=0.5"]  # fmt: skip


@dataclass
class Life:
    """One coordinator process: when it lived, how it ended, what the run directory held then."""

    crash_at: str | None
    started: float
    ended: float = 0.0
    returncode: int | None = None
    commits: dict[int, str] = field(default_factory=dict)
    metrics: list[int] = field(default_factory=list)
    model_files: set[int] = field(default_factory=set)
    final: bool = False


@dataclass
class Chain:
    run_dir: Path
    log: Path
    lives: list[Life]
    events: list[dict]
    fleet_returncode: int
    fleet_output: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def life_at(self, when: float) -> int:
        """The coordinator process that was (or had last been) alive at ``when``."""
        return max(i for i, life in enumerate(self.lives) if life.started < when)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(life: Life, run_dir: Path) -> None:
    life.commits = {c["round"]: c["model_sha256"] for c in read_lines(run_dir / "commits.jsonl")}
    life.metrics = [m["round"] for m in read_lines(run_dir / "metrics.jsonl")]
    life.model_files = {int(p.stem.split("-")[1]) for p in (run_dir / "models").glob("*.mlmodel")}
    life.final = (run_dir / "final.mlmodel").exists()


def run_chain(name: str, root: Path) -> Chain:
    crash_points, linger = (ASYNC_CHAIN, False) if name == "fedbuff" else CHAINS[name]
    length = [*FEDBUFF, "--versions"] if name == "fedbuff" else ["--rounds"]
    run_dir, log, out = root / "run", root / "server.log", root / "fleet"
    model = root / "tiny.mlmodel"
    model.write_bytes(spec_to_bytes(model_zoo.handwritten_cnn()))
    address = f"127.0.0.1:{free_port()}"
    first = ["--insecure", "--listen", address, "--run-dir", str(run_dir), "--model", str(model),
             "--min-devices", str(DEVICES), *length, str(ROUNDS), "--round-timeout", "30",
             "--session-ttl", "5", "--poll-interval-ms", "100", "--long-poll-ms", "500",
             "--handout-rate", "0"]  # fmt: skip
    lives: list[Life] = []

    def start(args: list[str], crash_at: str | None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if crash_at is not None:
            env[ENV] = crash_at
        lives.append(Life(crash_at, time.monotonic()))
        with log.open("a") as f:
            f.write(f"=== coordinator {len(lives)} ({ENV}={crash_at}) ===\n")
        extra = ["--linger"] if linger else []
        return subprocess.Popen([*CLI, "server", *args, *extra], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip

    server = start(first, crash_points[0])
    fleet = subprocess.Popen([sys.executable, str(FLEET), address, str(out), "--count",
                              str(DEVICES)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    try:
        for next_point in [*crash_points[1:], None]:
            try:
                lives[-1].returncode = server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"coordinator never reached {lives[-1].crash_at}:\n"
                            + log.read_text()[-4000:])  # fmt: skip
            lives[-1].ended = time.monotonic()
            snapshot(lives[-1], run_dir)
            time.sleep(0.2)  # a reply sent just before the kill lands before the next life
            server = start(["--resume", str(run_dir), "--listen", address], next_point)
        fleet_output, _ = fleet.communicate(timeout=120)
        if linger:  # the last coordinator keeps telling devices the run is finished: stop it
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
        lives[-1].returncode = server.wait(timeout=120)
        lives[-1].ended = time.monotonic()
        snapshot(lives[-1], run_dir)
    finally:
        for process in (server, fleet):
            if process.poll() is None:
                process.kill()
                process.wait()
    return Chain(run_dir, log, lives, read_lines(out / "events.jsonl"), fleet.returncode,
                 fleet_output)  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Each chain runs once, on first use; its outcome (or failure) is shared by its tests."""
    done: dict[str, Chain | BaseException] = {}

    def get(name: str) -> Chain:
        if name not in done:
            try:
                done[name] = run_chain(name, tmp_path_factory.mktemp(name))
            except BaseException as exc:
                done[name] = exc
        result = done[name]
        if isinstance(result, BaseException):
            raise result
        return result

    return get


# -- what each kill leaves behind -------------------------------------------------------------


@pytest.mark.parametrize("point", POINTS)
def test_crash_point(chain, point):
    name = CHAIN_OF[point]
    run = chain(name)
    index = next(i for i, life in enumerate(run.lives) if (life.crash_at or "").startswith(point))
    life = run.lives[index]
    round_number = int(life.crash_at.split(":")[1])
    text = run.log_text()
    assert life.returncode == -signal.SIGKILL, (life, text[-3000:])
    assert f"{ENV}: crash point {life.crash_at} reached" in text
    told = [e for e in run.events if e["event"] == "model" and e["time"] < life.ended
            and e["time"] > life.started]  # fmt: skip
    committed, judged = set(life.commits), set(life.metrics)
    if point == "after-aggregate":
        assert round_number not in committed and round_number not in life.model_files
    elif point == "after-model-file":
        assert round_number in life.model_files and round_number not in committed
    elif point in ("after-commit", "mid-judging", "before-metrics"):
        assert round_number in committed and round_number not in judged
    elif point == "after-handout":
        assert round_number in committed
        assert any(e["version"] == round_number for e in told)
    elif point == "after-metrics":
        assert round_number in judged
    elif point == "after-final":
        assert life.final and not any(e["kind"] == "finished" for e in told)
    elif point == "after-run-finished":
        # (devices asking at the same moment may hear it too before the process dies)
        assert life.final and any(e["kind"] == "finished" for e in told)
    # a device is never told of a version that was not committed when it was told
    assert all(e["version"] in committed for e in told)
    # the next coordinator resumed after the last round committed at the kill
    next_life = text.split(f"=== coordinator {index + 2} ")[1]
    assert re.search(rf"resuming run \d+ after round {max(committed)} of {ROUNDS} ", next_life)


# -- the finished runs ------------------------------------------------------------------------


def weighted_mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {name: sum(u[name].astype(np.float64) * n for u, n in updates) / total
            for name in updates[0][0]}  # fmt: skip


@pytest.mark.parametrize("name", list(CHAINS))
def test_the_run_finishes_and_every_version_names_one_model(chain, name):
    run = chain(name)
    text = run.log_text()
    assert run.lives[-1].returncode == 0, text[-3000:]
    assert run.fleet_returncode == 0, run.fleet_output[-3000:]
    models = run.run_dir / "models"

    # every (version, sha256) any device was told names exactly the bytes of that version's file
    told = {(e["version"], e["sha256"]) for e in run.events if e["event"] == "model"}
    assert {version for version, _ in told} == set(range(ROUNDS + 1))
    for version, digest in told:
        assert sha256(models / f"round-{version:04d}.mlmodel") == digest, version

    # one commit and one metrics line per round, in order, naming the same model as its file
    commits = read_lines(run.run_dir / "commits.jsonl")
    metrics = read_lines(run.run_dir / "metrics.jsonl")
    assert [c["round"] for c in commits] == list(range(ROUNDS + 1))
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
    for commit, line in zip(commits, metrics, strict=True):
        path = models / f"round-{commit['round']:04d}.mlmodel"
        assert commit["model_sha256"] == line["model_sha256"] == sha256(path)
    assert (run.run_dir / "final.mlmodel").read_bytes() == (
        models / f"round-{ROUNDS:04d}.mlmodel"
    ).read_bytes()
    assert not list(run.run_dir.rglob("*.tmp"))

    # each round's model: the weighted mean of what its committing process accepted
    accepted = [e for e in run.events if e["event"] == "accepted"]
    for round_number in range(1, ROUNDS + 1):
        committer = next(i for i, life in enumerate(run.lives) if round_number in life.commits)
        updates = [
            (dict(np.load(run.run_dir.parent / "fleet" / "updates" / f"{e['task']}.npz")),
             e["num_examples"])
            for e in accepted
            if e["round"] == round_number and run.life_at(e["time"]) == committer
        ]  # fmt: skip
        assert len(updates) == DEVICES, (round_number, committer, len(updates))
        shipped = dict(get_parameters(load_spec(models / f"round-{round_number:04d}.mlmodel")))
        for tensor, value in weighted_mean(updates).items():
            np.testing.assert_allclose(shipped[tensor], value, rtol=1e-6, atol=1e-7)
        assert metrics[round_number]["examples"] == sum(n for _, n in updates)

    # the devices came back by themselves after every kill, and all heard the run finish
    done = [e for e in run.events if e["event"] == "done"]
    assert len(done) == DEVICES
    for device in done:
        assert device["finished"] and device["error"] is None, device
        assert device["registrations"] >= 2, device  # registered again with a new coordinator


def test_fedbuff_killed_at_each_commit_point_resumes_and_replays_bit_for_bit(tmp_path):
    """Versions follow the commit rule through real kills; the restored server momentum and the
    applied updates recorded across four processes rebuild every version exactly."""
    run = run_chain("fedbuff", tmp_path)
    text = run.log_text()
    assert [life.returncode for life in run.lives] == [-signal.SIGKILL] * 3 + [0], text[-3000:]
    assert run.fleet_returncode == 0, run.fleet_output[-3000:]
    models = run.run_dir / "models"
    told = {(e["version"], e["sha256"]) for e in run.events if e["event"] == "model"}
    for version, digest in told:
        assert sha256(models / f"version-{version:04d}.mlmodel") == digest, version
    for life in run.lives:  # no device was told of a version before it was committed
        told_then = [e for e in run.events if e["event"] == "model"
                     and life.started < e["time"] < life.ended]  # fmt: skip
        assert all(e["version"] in life.commits for e in told_then)
    commits = read_lines(run.run_dir / "commits.jsonl")
    metrics = read_lines(run.run_dir / "metrics.jsonl")
    assert [c["round"] for c in commits] == [m["round"] for m in metrics] == list(range(ROUNDS + 1))
    assert all(m["fedbuff"]["applied"] == 2 for m in metrics[1:])
    assert (run.run_dir / "final.mlmodel").read_bytes() == (
        models / f"version-{ROUNDS:04d}.mlmodel"
    ).read_bytes()
    replayed = subprocess.run([*CLI, "replay", str(run.run_dir)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert f"{ROUNDS} version(s) replayed bit for bit" in replayed.stdout
