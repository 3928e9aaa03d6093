"""FedBuff on a Grid: hand-computed versions, the staleness cap, stopping, and a live gateway run
with scripted phones: versions committed before tasks name them, replayed bit for bit, resumed."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterable

import model_zoo
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
from fedcoreml.server.fedbuff import STALE, FedBuff, update_digest
from fedcoreml.server.fedbuff_replay import replay
from fedcoreml.server.flower_identity import set_task_identity
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError


@pytest.fixture(autouse=True)
def _flower_identity():
    set_task_identity(1)


class ScriptGrid(Grid):
    """Nodes that answer in a scripted order: each pull answers the next batch of nodes.

    A node answers the message it holds with ``received + offset`` and its example count.
    """

    def __init__(self, behaviour: dict[int, tuple[float, int]], batches: list[list[int]]):
        self.behaviour = behaviour
        self.batches = batches
        self.holding: dict[int, Message] = {}  # node -> its pending message
        self.received: list[tuple[int, int]] = []  # (node, server-round of the message)
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.behaviour)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            assert node not in self.holding, "a node was given a second task"
            self.holding[node] = message
            config = message.content.config_records["config"]
            self.received.append((node, int(config["server-round"])))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        asked = set(message_ids)
        if not self.batches or any(
            n not in self.holding or self.holding[n].metadata.message_id not in asked
            for n in self.batches[0]
        ):
            return []  # the next batch has not arrived, as far as this pull can tell
        replies = []
        for node in self.batches.pop(0):
            message = self.holding.pop(node)
            offset, examples = self.behaviour[node]
            arrays = message.content.array_records["arrays"]
            trained = {k: Array(a.numpy() + np.float32(offset)) for k, a in arrays.items()}
            content = RecordDict(
                {
                    "arrays": ArrayRecord(trained),
                    "metrics": MetricRecord({"num-examples": examples}),
                }
            )
            replies.append(Message(content, reply_to=message))
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        ids = self.push_messages(messages)
        return self.pull_messages(ids)


INITIAL = {"w": np.array([0.0, 1.0], np.float32), "b": np.array([2.0], np.float32)}


def run_script(strategy: FedBuff, grid: ScriptGrid, versions: int, published=None, **kw):
    published = [] if published is None else published

    def on_version(record, arrays, state):
        published.append((record, {k: a.numpy() for k, a in arrays.items()}))

    final = strategy.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in INITIAL.items()}),
        versions,
        60.0,
        ConfigRecord({"lr": 0.1}),
        on_version,
        **kw,
    )
    return published, final


def test_one_buffer_at_a_time_by_hand():
    """Versions, staleness weights and the server step, computed by hand for two versions."""
    grid = ScriptGrid(
        {1: (1.0, 10), 2: (3.0, 30), 3: (5.0, 20)},
        batches=[[1, 2], [3, 1]],  # 1 and 2 on version 0; then 3 (on version 0) and 1 (on 1)
    )
    strategy = FedBuff(concurrency=3, buffer_size=2, max_staleness=5, poll_interval_s=0.001)
    published, final = run_script(strategy, grid, versions=2)

    first, v1 = published[0]
    assert first.version == 1 and [u.staleness for u in first.applied] == [0, 0]
    step1 = (10 * 1.0 + 30 * 3.0) / 40  # staleness 0: weights are the examples
    np.testing.assert_array_equal(v1["w"], INITIAL["w"] + np.float32(step1))

    second, v2 = published[1]
    assert second.version == 2
    assert [(u.node_id, u.base_version, u.staleness) for u in second.applied] == [
        (3, 0, 1),
        (1, 1, 0),
    ]
    w3, w1 = 20 / math.sqrt(2), 10.0  # node 3 is one version stale: 20 / sqrt(1 + 1)
    assert [u.weight for u in second.applied] == [w3, w1]
    step2 = (w3 * 5.0 + w1 * 1.0) / (w3 + w1)
    np.testing.assert_allclose(v2["b"], v1["b"] + step2, rtol=1e-6)
    np.testing.assert_array_equal(final["b"].numpy(), v2["b"])
    # nodes 1 and 2 were handed version 1 (server-round 2) as soon as they answered
    assert (1, 2) in grid.received and (2, 2) in grid.received
    assert second.summary()["staleness"] == [1, 0] and second.summary()["staleness_max"] == 1


def test_an_update_past_the_staleness_cap_is_refused_and_counted():
    grid = ScriptGrid(
        {1: (1.0, 10), 2: (1.0, 10), 3: (9.0, 10)},
        batches=[[1, 2], [1, 2], [3, 1], [2]],  # node 3 answers on version 0 with version 2 out
    )
    strategy = FedBuff(concurrency=3, buffer_size=2, max_staleness=1, poll_interval_s=0.001)
    published, _ = run_script(strategy, grid, versions=3)
    third = published[2][0]
    assert third.refused == {STALE: 1}
    assert all(u.node_id != 3 or u.base_version >= 1 for r, _ in published for u in r.applied)


def test_the_run_stops_when_asked_between_versions():
    grid = ScriptGrid({1: (1.0, 10), 2: (1.0, 10)}, batches=[[1, 2]] * 10)
    strategy = FedBuff(concurrency=2, buffer_size=2, poll_interval_s=0.001)
    published: list = []
    published, final = run_script(
        strategy, grid, versions=10, published=published, should_stop=lambda: len(published) >= 3
    )
    assert len(published) == 3  # e.g. a target accuracy was reached after version 3
    np.testing.assert_array_equal(final["w"].numpy(), published[-1][1]["w"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"buffer_size": 0}, "buffer size must be at least 1"),
        ({"max_staleness": -1}, "max staleness must not be negative"),
        ({"staleness_exponent": -0.5}, "staleness exponent must not be negative"),
    ],
)
def test_fedbuff_settings_out_of_range_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        FedBuff(**options)


# -- over the device gateway, with scripted phones -------------------------------------------


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.mlmodel"
    path.write_bytes(spec_to_bytes(model_zoo.handwritten_cnn()))
    return path


def fedbuff_config(run_dir, model, **overrides) -> CoordinatorConfig:
    settings = {
        "run_dir": run_dir, "rounds": 4, "min_devices": 3, "strategy": "fedbuff", "model": model,
        "round_timeout": 30, "session_ttl": 2, "poll_interval_ms": 50, "concurrency": 3,
        "buffer_size": 2, "keep_updates": True, "strategy_args": {"server_momentum": 0.5},
    }  # fmt: skip
    return CoordinatorConfig(**{**settings, **overrides})


def run_fleet(coordinator: Coordinator, delays: list[float], seen: list | None = None):
    """Scripted phones (one per delay) through the coordinator's whole run; they are returned."""
    port = coordinator.start()
    directory = RunDirectory(coordinator.config.run_dir)

    def committed_before_named(_client, task, _parameters):
        commits = {c["round"]: c["model_sha256"] for c in directory.read_commits()}
        if seen is not None:
            seen.append(commits.get(task.model.version) == task.model.sha256)

    devices = [
        ScriptedDevice(f"127.0.0.1:{port}", f"phone-{i}", 40 * (i + 1), 0.01 * (i + 1),
                       delay_s=delay, noise=0.01, before_submit=committed_before_named)
        for i, delay in enumerate(delays)
    ]  # fmt: skip
    stop, threads = start_devices(devices)
    run_to_the_end(coordinator, stop, threads)
    assert all(d.error is None for d in devices), [d.error for d in devices]
    # even a phone still training when the last version came out hears that the run is over
    assert all(d.finished for d in devices)
    return devices


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_versions_over_the_gateway_are_committed_first_and_replay_bit_for_bit(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    seen: list[bool] = []
    devices = run_fleet(Coordinator(fedbuff_config(run_dir, tiny_model)), [0, 0, 0.4], seen)
    assert seen and all(seen)  # every task named a version already committed
    directory = RunDirectory(run_dir)
    commits, metrics = lines(directory.commits_file), lines(directory.metrics_file)
    assert [c["round"] for c in commits] == [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in directory.models.glob("version-*.mlmodel")) == [
        f"version-{v:04d}.mlmodel" for v in range(5)
    ]
    assert directory.final_model.read_bytes() == directory.round_model(4).read_bytes()
    for commit, line in zip(commits[1:], metrics[1:], strict=True):
        assert line["fedbuff"]["applied"] == len(commit["applied"]) == 2
        assert line["examples"] == sum(u["num_examples"] for u in commit["applied"])
        assert line["fedbuff"]["staleness"] == [u["staleness"] for u in commit["applied"]]
        assert line["elapsed_s"] >= commits[0]["elapsed_s"]
    # what was applied is what phones sent, each accepted update at most once
    sent = {update_digest(dict(s.parameters)) for d in devices for s in d.submissions}
    applied = [u["update_sha256"] for c in commits[1:] for u in c["applied"]]
    assert len(applied) == len(set(applied)) and set(applied) <= sent
    assert [v.version for v in replay(run_dir)] == [1, 2, 3, 4]

    # Killed after version 2 was committed: the directory then holds exactly this much.
    crashed = tmp_path / "crashed"
    shutil.copytree(run_dir, crashed)
    crashed_dir = RunDirectory(crashed)
    crashed_dir.commits_file.write_text("".join(json.dumps(c) + "\n" for c in commits[:3]))
    crashed_dir.metrics_file.write_text("".join(json.dumps(m) + "\n" for m in metrics[:3]))
    for version in (3, 4):
        crashed_dir.round_model(version).unlink()
        crashed_dir.server_state(version).unlink()
        shutil.rmtree(crashed_dir.version_updates(version))
    crashed_dir.final_model.unlink()
    resumed = Coordinator.resume(crashed)
    assert resumed.federated.start_round == 2
    run_fleet(resumed, [0, 0.2, 0])
    again = lines(crashed_dir.commits_file)
    assert [c["round"] for c in again] == [0, 1, 2, 3, 4] and again[:3] == commits[:3]
    assert again[3]["elapsed_s"] >= commits[2]["elapsed_s"]  # wall time carried over
    # the momentum was restored from version 2's state: the whole chain replays bit for bit
    assert [v.version for v in replay(crashed)] == [1, 2, 3, 4]


def test_a_task_made_too_stale_is_closed_and_its_phone_refused(tmp_path, tiny_model):
    config = fedbuff_config(tmp_path / "run", tiny_model, rounds=2, max_staleness=0,
                            keep_updates=False, strategy_args={})  # fmt: skip
    devices = run_fleet(Coordinator(config), [0, 0, 1.5])
    slow = devices[2]
    assert any("too stale: trained on version 0, version 1 is out" in m for m in slow.refused)
    metrics = lines(RunDirectory(tmp_path / "run").metrics_file)
    assert sum(m.get("fedbuff", {}).get("refused", {}).get(STALE, 0) for m in metrics) >= 1
    assert all(s == 0 for m in metrics[1:] for s in m["fedbuff"]["staleness"])


def test_replay_finds_a_kept_update_that_was_changed(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    run_fleet(Coordinator(fedbuff_config(run_dir, tiny_model, rounds=2)), [0, 0, 0])
    cli = [sys.executable, "-m", "fedcoreml.server.cli", "replay", str(run_dir)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 version(s) replayed bit for bit" in done.stdout
    kept = sorted(RunDirectory(run_dir).version_updates(2).glob("*.npz"))[0]
    arrays = dict(np.load(kept))
    name = next(iter(arrays))
    arrays[name] = arrays[name] + np.float32(1e-3)
    np.savez(kept, **arrays)
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "version 2" in done.stderr and "differ from what was applied" in done.stderr
    with pytest.raises(RunDirectoryError, match="differ from what was applied"):
        replay(run_dir)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "fedavg", "--rounds", "2", "--concurrency", "3"], "belong to the asynch"),
        (["--strategy", "fedavg", "--versions", "2"], "--versions belongs to --strategy fedbuff"),
        (["--strategy", "fedbuff", "--rounds", "2"], "give --versions, not --rounds"),
        (["--strategy", "fedbuff", "--versions", "2", "--fraction-evaluate", "0.5"],
         "--fraction-evaluate belong to synchronous rounds"),
        (["--strategy", "fedbuff", "--versions", "2", "--target-accuracy", "1.5"],
         r"--target-accuracy must lie in \(0, 1\]"),
        (["--strategy", "fedbuff", "--versions", "2", "--strategy-arg", "server_optimizer=sgdm"],
         "choose one of sgd, adam"),
        (["--strategy", "fedbuff"], "missing --versions"),
    ],
)  # fmt: skip
def test_fedbuff_options_are_checked_before_anything_starts(tmp_path, extra, message):
    argv = ["server", "--insecure", "--run-dir", str(tmp_path / "run"), "--min-devices", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "fedcoreml.server.cli", *argv, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "run").exists()


def test_model_files_follow_the_strategy_named_in_run_json(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    assert directory.round_model(3).name == "round-0003.mlmodel"
    directory.write_config({"run_id": 1, "strategy": "fedbuff"})
    assert directory.round_model(3).name == "version-0003.mlmodel"
    assert RunDirectory(tmp_path / "run").round_model(0).name == "version-0000.mlmodel"


def test_the_run_ends_at_the_target_accuracy_with_every_version_judged(tmp_path, tiny_model):
    config = fedbuff_config(tmp_path / "run", tiny_model, rounds=1000, target_accuracy=0.01,
                            keep_updates=False, strategy_args={})  # fmt: skip
    coordinator = Coordinator(config)
    run_fleet(coordinator, [0.05, 0.05, 0.05])
    directory = RunDirectory(tmp_path / "run")
    commits, metrics = lines(directory.commits_file), lines(directory.metrics_file)
    last = commits[-1]["round"]
    assert last < 1000 and coordinator.federated.final_version == last
    assert [m["round"] for m in metrics] == [c["round"] for c in commits]  # all judged
    assert any(m["test_accuracy"] >= 0.01 for m in metrics)
    assert directory.final_model.read_bytes() == directory.round_model(last).read_bytes()


def test_the_demo_shows_versions_with_the_staleness_they_applied():
    from rich.console import Console

    from fedcoreml.server.demo import _round_table
    from fedcoreml.server.run_config import RoundRecord

    base = {"test_loss": 1.0, "devices_failed": 0, "model_sha256": "ab", "seconds": 2.0}
    records = [
        RoundRecord(round=0, test_accuracy=0.1, devices_sampled=0, devices_reported=0,
                    examples=0, **base),
        RoundRecord(round=1, test_accuracy=0.6, devices_sampled=7, devices_reported=4,
                    examples=540, fedbuff={"staleness": [2, 1, 0, 0]}, **base),
    ]  # fmt: skip
    console = Console(width=200, record=True)
    console.print(_round_table(records, "version"))
    text = console.export_text()
    assert "versions" in text and "staleness" in text and "accepted/sent" in text
    assert "2 1 0 0" in text and "4/7" in text
