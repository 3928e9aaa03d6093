"""fedcoreml as a Flower App: the same run on Flower's simulation and deployment runtimes.

The end-to-end tests start Flower's own processes (``flower-superlink``, ``flower-supernode``,
``flwr run .``) on 127.0.0.1 with the app in this repository, offline, and check what the run
directory holds: every round's model is the examples-weighted mean of the updates the nodes
returned (kept by ``keep-updates``), judged and recorded as ``fedcoreml server`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flower_runtime import FlowerRuntime
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcoreml.ios_bridge.mlmodel_io import load_spec
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.server import flower_app
from fedcoreml.server.fedbuff_replay import replay
from fedcoreml.server.flower_app import FlowerRunError, config_from_run_config
from fedcoreml.server.flower_identity import set_task_identity

pytest.importorskip("ray", reason="the simulation runtime needs fedcoreml[simulation]")

APP_DEFAULTS = {
    "num-server-rounds": 3, "strategy": "fedavg", "strategy-args": "", "fraction-train": 0.1,
    "fraction-evaluate": 0.0, "min-nodes": 2, "model": "", "local-epochs": 1, "batch-size": 32,
    "lr": 0.001, "round-timeout": 600.0, "data-dir": "", "partition": "iid", "seed": 0,
    "eval-data-dir": "", "run-dir": "", "keep-updates": False, "concurrency": 0, "buffer": 0,
    "max-staleness": 10, "target-accuracy": 0.0,
}  # fmt: skip


def check_run_directory(run_dir: Path, rounds: int, per_round: int) -> None:
    """Each round's model is the examples-weighted mean of exactly the updates kept for it."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(rounds + 1))
    for round_number in range(1, rounds + 1):
        kept = sorted((run_dir / "updates" / f"round-{round_number:04d}").glob("node-*.npz"))
        assert len(kept) == per_round == lines[round_number]["devices_reported"]
        updates = [dict(np.load(path)) for path in kept]
        weights = [int(u.pop("num-examples")) for u in updates]
        assert sum(weights) == lines[round_number]["examples"]
        model = dict(
            get_parameters(load_spec(run_dir / "models" / f"round-{round_number:04d}.mlmodel"))
        )
        for name, value in model.items():
            mean = sum(
                u[name].astype(np.float64) * w for u, w in zip(updates, weights, strict=True)
            )
            np.testing.assert_allclose(value, mean / sum(weights), rtol=1e-5, atol=1e-6)
    assert lines[-1]["test_accuracy"] > lines[0]["test_accuracy"] + 0.2  # it learned
    assert (run_dir / "final.mlmodel").read_bytes() == (
        run_dir / "models" / f"round-{rounds:04d}.mlmodel"
    ).read_bytes()


@pytest.fixture
def runtime(tmp_path):
    flower = FlowerRuntime(tmp_path)
    yield flower
    flower.close()


def test_the_run_config_maps_onto_the_coordinator_config(tmp_path):
    config = config_from_run_config(
        {**APP_DEFAULTS, "run-dir": str(tmp_path), "strategy": "fedavgm", "lr": 0.0,
         "strategy-args": "server_momentum=0.9", "data-dir": "/data/fmnist"},
        run_id=7,
    )  # fmt: skip
    assert config.run_dir == tmp_path and config.rounds == 3 and config.min_devices == 2
    assert config.strategy_args == {"server_momentum": 0.9}
    assert config.learning_rate is None  # 0: the model's own default
    assert config.eval_data == "/data/fmnist"  # the nodes' data set's test split
    assert config_from_run_config(APP_DEFAULTS, run_id=7).run_dir == Path("runs/flower-7")


def test_fedbuff_s_run_config_maps_onto_its_options(tmp_path):
    config = config_from_run_config(
        {**APP_DEFAULTS, "strategy": "fedbuff", "concurrency": 3, "buffer": 2,
         "max-staleness": 4, "target-accuracy": 0.9, "keep-updates": True},
        run_id=7,
    )  # fmt: skip
    assert config.asynchronous and config.fraction == 1.0  # concurrency, not a fraction
    assert (config.fedbuff_concurrency, config.fedbuff_buffer, config.max_staleness) == (3, 2, 4)
    assert config.target_accuracy == 0.9 and config.keep_updates
    defaults = config_from_run_config({**APP_DEFAULTS, "strategy": "fedbuff"}, run_id=7)
    assert (defaults.fedbuff_concurrency, defaults.fedbuff_buffer) == (2, 2)  # min-nodes
    assert defaults.target_accuracy is None


class FailingGrid(Grid):
    """Flower's view of nodes whose ClientApp raised: every reply is an error."""

    def __init__(self) -> None:
        self._run = Run.create_empty(5)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(Error(0, "ClientApp raised"), reply_to=m) for m in messages]


def test_a_run_where_no_node_trained_is_reported_as_failed(tmp_path):
    set_task_identity(5)
    context = Context(
        run_id=5, node_id=0, node_config={}, state=RecordDict(),
        run_config={**APP_DEFAULTS, "num-server-rounds": 2, "run-dir": str(tmp_path / "run")},
    )  # fmt: skip
    with pytest.raises(
        FlowerRunError, match=r"no node returned an update in 2 round\(s\) \(2 fail"
    ):
        flower_app.main(FailingGrid(), context)
    assert (tmp_path / "run" / "final.mlmodel").exists()  # what there is, is still recorded


@pytest.mark.slow
@pytest.mark.flower
def test_simulation_runtime_runs_the_app_end_to_end(runtime, tmp_path):
    runtime.start_superlink(simulation=True)
    run_dir = tmp_path / "run"
    run_id = runtime.run_app(
        f"num-server-rounds=2 min-nodes=4 fraction-train=0.5 run-dir='{run_dir}' keep-updates=true",
        federation_config="num-supernodes=4",
    )
    status, details = runtime.wait(run_id, timeout=300)
    assert status == "finished:completed", (details, runtime.run_log(run_id))
    check_run_directory(run_dir, rounds=2, per_round=2)


@pytest.mark.slow
@pytest.mark.flower
def test_fedbuff_runs_on_flower_s_simulation_runtime_through_push_and_pull(runtime, tmp_path):
    """The same asynchronous strategy over Flower's own Grid: versions replay bit for bit."""
    runtime.start_superlink(simulation=True)
    run_dir = tmp_path / "run"
    run_id = runtime.run_app(
        f"strategy='fedbuff' num-server-rounds=3 min-nodes=3 concurrency=3 buffer=2 "
        f"run-dir='{run_dir}' keep-updates=true",
        federation_config="num-supernodes=3",
    )
    status, details = runtime.wait(run_id, timeout=300)
    assert status == "finished:completed", (details, runtime.run_log(run_id))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    assert all(line["fedbuff"]["applied"] == 2 for line in lines[1:])
    assert lines[-1]["test_accuracy"] > lines[0]["test_accuracy"] + 0.1  # it learned
    assert [v.version for v in replay(run_dir)] == [1, 2, 3]
    assert (run_dir / "final.mlmodel").read_bytes() == (
        run_dir / "models" / "version-0003.mlmodel"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.flower
def test_deployment_runtime_runs_the_app_and_fedbuff_on_supernodes(runtime, tmp_path):
    runtime.start_superlink(simulation=False)
    for index in range(3):
        runtime.start_supernode(index, 3)
    run_dir = tmp_path / "run"
    run_id = runtime.run_app(
        f"num-server-rounds=2 min-nodes=3 fraction-train=1.0 run-dir='{run_dir}' keep-updates=true"
    )
    status, details = runtime.wait(run_id, timeout=400)
    assert status == "finished:completed", (details, runtime.run_log(run_id))
    check_run_directory(run_dir, rounds=2, per_round=3)

    # FedBuff on the same SuperLink and SuperNodes: Flower's gRPC Grid, push and pull alone
    async_dir = tmp_path / "async"
    run_id = runtime.run_app(
        f"strategy='fedbuff' num-server-rounds=2 min-nodes=3 concurrency=3 buffer=2 "
        f"run-dir='{async_dir}' keep-updates=true"
    )
    status, details = runtime.wait(run_id, timeout=400)
    assert status == "finished:completed", (details, runtime.run_log(run_id))
    lines = [json.loads(x) for x in (async_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert [v.version for v in replay(async_dir)] == [1, 2]


def test_a_node_reads_its_partition_and_may_name_its_own_data(shared_mnist):
    from fedcoreml.client_sim.flower_client import node_data

    def context(**node_config):
        return Context(
            run_id=1, node_id=1, state=RecordDict(), run_config={**APP_DEFAULTS, "seed": 3},
            node_config={"partition-id": 1, "num-partitions": 2, **node_config},
        )  # fmt: skip

    bundled, seed = node_data(context())
    assert len(bundled.y_train) == 900 and len(bundled.y_eval) == 100  # 2,000 / 2, 10 % held out
    own, _ = node_data(context(**{"data-dir": str(shared_mnist)}))
    assert len(own.y_train) + len(own.y_eval) == 2500  # its own 5,000 images, half of them
    assert seed == 3 * 1_000_003 + 1  # the fleet's device 1 of a fleet seeded 3
