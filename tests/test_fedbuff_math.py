"""FedBuff's arithmetic: staleness weights, a buffer's mean, and server steps that are Flower's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedcoreml.server.fedbuff_math import (
    BufferedUpdate,
    ServerOptimizer,
    ServerState,
    buffer_mean,
    server_step,
    staleness_weight,
)
from fedcoreml.server.flower_identity import set_task_identity


@pytest.fixture(autouse=True)
def _flower_identity():
    set_task_identity(1)  # Flower's Message needs a run's identity outside its runtime


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weights": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
    }


def test_the_default_discount_is_one_over_the_root_of_one_plus_staleness():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    assert staleness_weight(8) == pytest.approx(1 / 3)
    assert staleness_weight(5, exponent=0) == 1.0
    assert staleness_weight(1, exponent=1) == 0.5
    with pytest.raises(ValueError, match="negative"):
        staleness_weight(-1)


def test_a_buffer_s_mean_is_the_weighted_mean_of_its_deltas():
    deltas = [arrays(1), arrays(2), arrays(3)]
    weights = [10 * 1.0, 30 * staleness_weight(1), 20 * staleness_weight(3)]
    pairs = list(zip(weights, deltas, strict=True))
    updates = [BufferedUpdate(f"d{i}", 0, 0, 1, w, d) for i, (w, d) in enumerate(pairs)]
    mean = buffer_mean(updates)
    for name in deltas[0]:
        expected = sum(w * d[name].astype(np.float64) for w, d in pairs) / sum(weights)
        np.testing.assert_array_equal(mean[name], expected.astype(np.float32))
        assert mean[name].dtype == np.float32
    with pytest.raises(ValueError, match="empty"):
        buffer_mean([])


def _reply(values: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content, dst_node_id=0, message_type="train")


def _as_reply(message: Message) -> Message:
    return Message(message.content, reply_to=Message(RecordDict(), 7, "train"))


def test_the_plain_step_is_the_aggregate_itself():
    current, delta = arrays(4), arrays(5)
    new, state = server_step(current, delta, ServerOptimizer(), ServerState())
    for name in current:
        np.testing.assert_array_equal(new[name], current[name] + delta[name])
    assert state.steps == 1


def test_the_momentum_step_is_flower_s_fedavgm_bit_for_bit_over_two_steps():
    optimizer = ServerOptimizer("sgd", learning_rate=0.7, momentum=0.9)
    flower = FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    current = arrays(6)
    flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    state = ServerState()
    for step, seed in enumerate((7, 8), start=1):
        delta = arrays(seed)
        new, state = server_step(current, delta, optimizer, state)
        aggregated = {k: (current[k] + delta[k]).astype(np.float32) for k in current}
        theirs, _ = flower.aggregate_train(step, [_as_reply(_reply(aggregated))])
        for name in current:
            np.testing.assert_array_equal(new[name], theirs[name].numpy())
        current = new
    assert state.steps == 2 and state.momentum is not None


def test_the_adam_step_is_flower_s_fedadam_bit_for_bit():
    optimizer = ServerOptimizer("adam", learning_rate=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    flower = FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    current, delta = arrays(9), arrays(10)
    flower.current_arrays = dict(current)
    new, state = server_step(current, delta, optimizer, ServerState())
    aggregated = {k: (current[k] + delta[k]).astype(np.float32) for k in current}
    theirs, _ = flower.aggregate_train(1, [_as_reply(_reply(aggregated))])
    for name in current:
        np.testing.assert_array_equal(new[name], theirs[name].numpy())
        np.testing.assert_array_equal(state.m[name], flower.m_t[name])
        np.testing.assert_array_equal(state.v[name], flower.v_t[name])


def test_server_state_survives_bytes_exactly():
    state = ServerState(3, m=arrays(11), v=arrays(12))
    back = ServerState.from_bytes(state.to_bytes())
    assert back.steps == 3 and back.momentum is None
    for name in state.m:
        np.testing.assert_array_equal(back.m[name], state.m[name])
        np.testing.assert_array_equal(back.v[name], state.v[name])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "sgdm"}, "choose one of sgd, adam"),
        ({"learning_rate": 0.0}, "learning rate must be positive"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ({"kind": "adam", "momentum": 0.5}, "belongs to the sgd"),
        ({"beta_1": 0.5}, "belong to the adam"),
    ],
)
def test_a_server_optimizer_out_of_range_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizer(**options)


def test_mismatched_names_are_refused():
    with pytest.raises(ValueError, match="the model has"):
        server_step(arrays(1), {"other": np.zeros(1, np.float32)}, ServerOptimizer(), ServerState())
    assert math.isclose(staleness_weight(1), 1 / math.sqrt(2))
