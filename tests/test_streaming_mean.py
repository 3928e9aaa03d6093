"""Averaging updates as they arrive: exact, order-free, thread-safe, and wired into the board."""

from __future__ import annotations

import itertools
import threading
from fractions import Fraction

import numpy as np
import pytest

from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard, TaskConfig, UpdateResult
from fedcoreml.server.streaming_mean import StreamingWeightedMean


def update(values: dict[str, np.ndarray], examples: int, accuracy: float = 0.5) -> UpdateResult:
    params = [(n, np.asarray(v, np.float32)) for n, v in values.items()]
    return UpdateResult(params, examples, loss=1.0 - accuracy, accuracy=accuracy, train_seconds=2)


def exact_mean(updates: list[UpdateResult], name: str) -> np.ndarray:
    """The weighted mean computed in rationals, then rounded once to float32."""
    shape = dict(updates[0].parameters)[name].shape
    flat = []
    total = sum(u.num_examples for u in updates)
    for i in range(int(np.prod(shape))):
        s = sum(Fraction(float(dict(u.parameters)[name].flat[i])) * u.num_examples for u in updates)
        flat.append(np.float32(float(s / total)))  # float(Fraction) rounds correctly
    return np.array(flat, np.float32).reshape(shape)


def hostile_updates(seed: int, count: int = 7) -> list[UpdateResult]:
    """Values spread over many magnitudes and signs: naive float sums depend on the order.

    The first two updates carry +-1e30 in element 0, which cancel exactly: a plain sum keeps
    the small values only if they are added after the cancellation.
    """
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        mantissa = rng.standard_normal(64)
        exponent = rng.integers(-20, 20, 64)
        values = (mantissa * 2.0**exponent).astype(np.float32).reshape(4, 16)
        if i < 2:
            values[0, 0] = 1e30 if i == 0 else -1e30
        examples = 1000 if i < 2 else int(rng.integers(1, 5000))
        updates.append(update({"w": values, "b": rng.standard_normal(3)}, examples))
    return updates


def test_the_mean_is_the_correctly_rounded_weighted_mean():
    updates = hostile_updates(0)
    mean = StreamingWeightedMean()
    for u in updates:
        mean.reserve()
        mean.add(u)
    result = dict(mean.mean())
    for name in ("w", "b"):
        np.testing.assert_array_equal(result[name], exact_mean(updates, name))
    assert mean.count == 7 and mean.total_examples == sum(u.num_examples for u in updates)


def test_the_result_does_not_depend_on_arrival_order():
    updates = hostile_updates(1, count=6)
    results, naive = set(), set()
    for order in itertools.permutations(range(6)):
        mean = StreamingWeightedMean()
        total = np.zeros((4, 16))
        for i in order:
            mean.reserve()
            mean.add(updates[i])
            total += dict(updates[i].parameters)["w"].astype(np.float64) * updates[i].num_examples
        results.add(dict(mean.mean())["w"].tobytes())
        naive.add((total / mean.total_examples).astype(np.float32).tobytes())
    assert len(results) == 1
    assert len(naive) > 1  # the data really is order-sensitive for a plain float64 sum


def test_weights_are_example_counts_and_clear_forgets_everything():
    mean = StreamingWeightedMean()
    for u in (update({"w": [1.0]}, 100), update({"w": [3.0]}, 300)):
        mean.reserve()
        mean.add(u)
    assert dict(mean.mean())["w"][0] == 2.5 and mean.total_examples == 400
    mean.clear()  # an abandoned attempt's updates
    assert mean.count == 0 and mean.total_examples == 0
    mean.reserve()
    mean.add(update({"w": [7.0], "b": [1.0]}, 5))
    assert {name: value.tolist() for name, value in mean.mean()} == {"w": [7.0], "b": [1.0]}
    mean.reserve()
    with pytest.raises(RuntimeError, match="not added yet"):
        mean.clear()  # an update still on its way would be lost or half counted


def test_a_mismatched_update_changes_nothing():
    mean = StreamingWeightedMean()
    mean.reserve()
    mean.add(update({"a": [1.0, 2.0], "b": [1.0]}, 10))
    mean.reserve()
    with pytest.raises(ValueError, match="tensor 'b'"):
        mean.add(update({"a": [5.0, 5.0], "b": [1.0, 1.0]}, 10))
    assert mean.settle(timeout_s=1)  # the failed add released its reservation
    assert dict(mean.mean())["a"].tolist() == [1.0, 2.0] and mean.count == 1
    with pytest.raises(ValueError, match="outside"):
        mean.add(update({"a": [1.0, 1.0], "b": [1.0]}, 2**24))


def test_settle_waits_for_reserved_updates_from_other_threads():
    mean = StreamingWeightedMean()
    updates = [update({"w": np.full(1000, i, np.float32)}, i + 1) for i in range(40)]
    for _ in updates:
        mean.reserve()
    assert not mean.settle(timeout_s=0.05)
    threads = [threading.Thread(target=mean.add, args=(u,)) for u in updates]
    for t in threads:
        t.start()
    assert mean.settle(timeout_s=10)
    expected = sum(i * (i + 1) for i in range(40)) / sum(range(1, 41))
    np.testing.assert_allclose(dict(mean.mean())["w"], expected, rtol=1e-7)


def test_the_board_folds_accepted_updates_into_the_aggregator_and_keeps_no_tensors():
    board = TaskBoard()
    model = RoundModel.from_bytes(0, b"model")
    mean = StreamingWeightedMean()
    config = TaskConfig(1, 8, 0.1)
    task = board.assign(7, "train", 1, model, config, 30, aggregator=mean)
    late = board.assign(8, "train", 1, model, config, 30, aggregator=mean)
    board.complete(task.task_id, 7, update({"w": [2.0]}, 10))
    board.close([late.task_id], "round closed")
    with pytest.raises(Exception, match="closed"):
        board.complete(late.task_id, 8, update({"w": [100.0]}, 10))
    assert mean.settle(timeout_s=1) and mean.count == 1
    assert dict(mean.mean())["w"].tolist() == [2.0]  # the refused one never reached it
    assert task.result.parameters == [] and task.result.num_examples == 10


def test_an_update_the_aggregator_refuses_fails_its_task():
    board = TaskBoard()
    model = RoundModel.from_bytes(0, b"model")
    mean = StreamingWeightedMean()
    config = TaskConfig(1, 8, 0.1)
    first = board.assign(7, "train", 1, model, config, 30, aggregator=mean)
    odd = board.assign(8, "train", 1, model, config, 30, aggregator=mean)
    board.complete(first.task_id, 7, update({"w": [2.0]}, 10))
    with pytest.raises(ValueError, match="shape"):
        board.complete(odd.task_id, 8, update({"w": [1.0, 1.0]}, 10))
    # a submitted task always means an update in the mean: this one is failed instead
    assert odd.status == "failed" and "not aggregated" in odd.failure and odd.result is None
    assert mean.settle(timeout_s=1) and mean.count == 1
