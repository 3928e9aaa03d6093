"""MeanOnArrival: the strategy owns the round's mean, DeviceGrid feeds it, each reply is a device's.

Rounds run on a real DeviceGrid, TaskBoard and SessionRegistry; a thread plays the devices,
answering their tasks on the board in a shuffled order (no sockets: the gateway's part is
covered by tests/test_coordinator.py).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from test_streaming_mean import exact_mean, hostile_updates

from fedcoreml.ios_bridge.flower_messages import (
    BATCH_SIZE_KEY,
    EPOCHS_KEY,
    LEARNING_RATE_KEY,
    NUM_EXAMPLES_KEY,
    parameters_to_arrays,
)
from fedcoreml.server.device_grid import DeviceGrid, RoundPolicy
from fedcoreml.server.exchanges import RecordingGrid
from fedcoreml.server.flower_identity import set_task_identity
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, Task, TaskBoard, UpdateResult
from fedcoreml.server.mean_on_arrival import ON_ARRIVAL, MeanOnArrival, UpdateFeed
from fedcoreml.server.strategies import make_strategy

# device id, the task it was given, how many tasks it had before -> its update (None: it drops it)
Answer = Callable[[str, Task, int], UpdateResult | None]


class BytesStore:
    """ModelStore's part for DeviceGrid: one model per parameter set (its bytes unread here)."""

    def build(self, parameters, version: int) -> RoundModel:
        return RoundModel.from_bytes(version, b"".join(v.tobytes() for _, v in parameters))


class Fleet:
    """Registered devices that answer their tasks, in a shuffled order, from another thread."""

    def __init__(self, count: int, answer: Answer, seed: int = 0) -> None:
        self.registry = SessionRegistry(idle_ttl_s=60)
        self.board = TaskBoard()
        self.devices = {self.registry.register(f"phone-{i}").node_id: f"phone-{i}"
                        for i in range(count)}  # fmt: skip
        self.answer = answer
        self.completed: list[Task] = []
        self._rng = random.Random(seed)
        self._tasks_seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def grid(self, policy: RoundPolicy | None = None) -> DeviceGrid:
        return DeviceGrid(self.registry, self.board, BytesStore(), 1, 10.0, policy=policy)

    def __enter__(self) -> Fleet:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        handled: set[str] = set()
        while not self._stop.wait(0.005):
            tasks = [self.board.next_task(node) for node in self.devices]
            tasks = [t for t in tasks if t is not None and t.task_id not in handled]
            self._rng.shuffle(tasks)
            for task in tasks:
                handled.add(task.task_id)
                device = self.devices[task.node_id]
                before = self._tasks_seen.get(device, 0)
                self._tasks_seen[device] = before + 1
                result = self.answer(device, task, before)
                if result is None:
                    self.board.fail_node_tasks(task.node_id, "app restarted")
                    continue
                self.board.complete(task.task_id, task.node_id, result)
                self.completed.append(task)


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity(1)  # Flower's messages need one outside its runtime


def train_config() -> ConfigRecord:
    return ConfigRecord({EPOCHS_KEY: 1, BATCH_SIZE_KEY: 8, LEARNING_RATE_KEY: 0.1})


def train_round(strategy, grid, arrays, server_round: int = 1):
    messages = list(strategy.configure_train(server_round, arrays, train_config(), grid))
    replies = list(grid.send_and_receive(messages, timeout=10))
    return messages, replies, strategy.aggregate_train(server_round, replies)


def fedavg(fold: bool, devices: int, **options):
    return make_strategy(
        options.pop("name", "fedavg"), fraction_train=1.0, fraction_evaluate=0.0,
        min_devices=devices, options=options, fold_on_arrival=fold,
    )  # fmt: skip


def test_the_optimisers_apply_their_server_step_on_top_of_the_folded_mean():
    for flower, folding in ON_ARRIVAL.items():
        order = folding.__mro__
        assert order.index(MeanOnArrival) == order.index(FedAvg) - 1
        assert issubclass(folding, flower) and folding.__init__ is flower.__init__
    for flower in (FedAvgM, FedAdam, FedYogi, FedAdagrad):  # their step runs after the mean
        assert ON_ARRIVAL[flower].aggregate_train is flower.aggregate_train
    assert isinstance(DeviceGrid.__new__(DeviceGrid), UpdateFeed)
    assert not isinstance(RecordingGrid(DeviceGrid.__new__(DeviceGrid)), UpdateFeed)


def test_the_mean_is_correctly_rounded_and_every_reply_is_its_own_devices():
    updates = hostile_updates(3, count=7)
    by_device = {f"phone-{i}": u for i, u in enumerate(updates)}
    strategy = fedavg(True, len(updates))
    assert type(strategy) is MeanOnArrival
    initial = parameters_to_arrays((n, np.zeros_like(v)) for n, v in updates[0].parameters)
    with Fleet(len(updates), lambda device, _task, _n: by_device[device]) as fleet:
        messages, replies, (arrays, metrics) = train_round(strategy, fleet.grid(), initial)
    for name in ("w", "b"):
        np.testing.assert_array_equal(arrays[name].numpy(), exact_mean(updates, name))
    assert list(arrays.keys()) == list(initial.keys())
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    assert len(replies) == len(updates)
    for reply in replies:
        # a reply answers its own instruction, from its own device, with its own numbers
        assert sent_to[reply.metadata.reply_to_message_id] == reply.metadata.src_node_id
        own = by_device[fleet.devices[reply.metadata.src_node_id]]
        assert not reply.content.array_records  # folded in, not carried
        assert reply.content["metrics"][NUM_EXAMPLES_KEY] == own.num_examples
        assert reply.content["metrics"]["accuracy"] == own.accuracy
    # the board kept no device's tensors, only their metrics
    assert len(fleet.completed) == len(updates)
    assert all(task.result.parameters == [] for task in fleet.completed)
    total = sum(u.num_examples for u in updates)
    expected = sum(u.accuracy * u.num_examples for u in updates) / total
    assert metrics["accuracy"] == pytest.approx(expected)


def dyadic_updates(seed: int, names_shapes: dict[str, tuple[int, ...]]) -> list[UpdateResult]:
    """Updates on which Flower's FedAvg is exact: weights 1, 1, 2 (factors 1/4, 1/4, 1/2) and
    values k/1024 with |k| < 2**12, so every product and partial sum is a float32."""
    rng = np.random.default_rng(seed)
    updates = []
    for weight in (1, 1, 2):
        params = [(n, (rng.integers(-4095, 4096, shape) / 1024).astype(np.float32))
                  for n, shape in names_shapes.items()]  # fmt: skip
        updates.append(UpdateResult(params, weight, 0.5, 0.5, 1.0))
    return updates


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavg", {}),
        ("fedavgm", {"server_momentum": 0.5, "server_learning_rate": 0.7}),
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
    ],
)
def test_folding_gives_flowers_own_result_bit_for_bit(name, options):
    """Two rounds (the optimiser's state carries over) with and without folding: the same bits.

    With folding the updates arrive in a shuffled order; Flower's strategy gets the replies
    sorted by device id.
    """
    shapes = {"conv.weights": (3, 2, 2), "conv.bias": (3,), "fc.weights": (5, 4)}
    rounds = [dyadic_updates(1, shapes), dyadic_updates(2, shapes)]

    def answer(device: str, task: Task, _before: int) -> UpdateResult:
        return rounds[task.round - 1][int(device.split("-")[1])]

    initial = parameters_to_arrays(dyadic_updates(0, shapes)[0].parameters)
    results = {}
    for fold, seed in ((True, 5), (False, 0)):
        strategy = fedavg(fold, 3, name=name, **options)
        assert isinstance(strategy, MeanOnArrival) == fold
        arrays, seen = initial, []
        with Fleet(3, answer, seed=seed) as fleet:
            grid = fleet.grid()
            for server_round in (1, 2):
                _, replies, (arrays, _) = train_round(strategy, grid, arrays, server_round)
                assert all(bool(r.content.array_records) != fold for r in replies)
                seen.append({n: (a.numpy().dtype, a.numpy().tobytes()) for n, a in arrays.items()})
        results[fold] = seen
    assert results[True] == results[False]


def test_an_abandoned_attempts_updates_are_taken_out_of_the_mean():
    """Attempt 1 gets one report of the two required and is sent again: only attempt 2 counts."""

    def answer(device: str, _task: Task, before: int) -> UpdateResult | None:
        if before == 0 and device == "phone-1":  # first attempt: phone-1 drops its task
            return None
        value = (1e6 if before == 0 else 1.0) if device == "phone-0" else 3.0
        return UpdateResult([("w", np.full(2, value, np.float32))], 1, 0.1, 0.9, 1.0)

    strategy = fedavg(True, 2)
    initial = parameters_to_arrays([("w", np.zeros(2, np.float32))])
    with Fleet(2, answer) as fleet:
        grid = fleet.grid(RoundPolicy(min_reports=2, max_attempts=2))
        _, replies, (arrays, _) = train_round(strategy, grid, initial)
    assert grid.history[0].abandoned == 1 and len(replies) == 2
    assert arrays["w"].numpy().tolist() == [2.0, 2.0]


def test_the_last_attempt_goes_on_with_the_updates_that_arrived():
    def answer(device: str, _task: Task, _before: int) -> UpdateResult | None:
        return None if device == "phone-1" else UpdateResult([("w", np.ones(2))], 3, 0, 0, 1)

    strategy = fedavg(True, 2)
    initial = parameters_to_arrays([("w", np.zeros(2, np.float32))])
    with Fleet(2, answer) as fleet:
        grid = fleet.grid(RoundPolicy(min_reports=2, max_attempts=1))
        _, replies, (arrays, _) = train_round(strategy, grid, initial)
    assert sorted(r.has_error() for r in replies) == [False, True]
    assert arrays["w"].numpy().tolist() == [1.0, 1.0]


def test_replies_that_do_not_match_the_folded_updates_are_refused():
    updates = dyadic_updates(4, {"w": (2,)})
    strategy = fedavg(True, 3)
    initial = parameters_to_arrays([("w", np.zeros(2, np.float32))])
    with Fleet(3, lambda device, _t, _n: updates[int(device[-1])]) as fleet:
        grid = fleet.grid()
        messages = list(strategy.configure_train(1, initial, train_config(), grid))
        replies = list(grid.send_and_receive(messages, timeout=10))
    with pytest.raises(AggregationError, match=r"2 valid replies .* but 3 updates"):
        strategy.aggregate_train(1, replies[:2])


def test_on_a_grid_that_does_not_feed_updates_it_is_flowers_fedavg():
    updates = hostile_updates(4, count=3)
    initial = parameters_to_arrays((n, np.zeros_like(v)) for n, v in updates[0].parameters)
    outcomes = []
    for strategy in (fedavg(True, 3), fedavg(False, 3)):
        with Fleet(3, lambda device, _t, _n: updates[int(device[-1])]) as fleet:
            grid = RecordingGrid(fleet.grid())  # as on Flower's runtime: not an UpdateFeed
            _, replies, (arrays, _) = train_round(strategy, grid, initial)
        assert all(r.content.array_records for r in replies)
        outcomes.append({n: a.numpy().tobytes() for n, a in arrays.items()})
    assert outcomes[0] == outcomes[1]
