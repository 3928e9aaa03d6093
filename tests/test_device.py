"""Simulated devices (DeviceClient + the Core ML emulator) against the fake coordinator."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import model_zoo
import numpy as np
import pytest
from fake_coordinator import (
    CHUNK,
    MODEL_0,
    MODEL_1,
    FakeCoordinator,
    evaluate,
    serve,
    train,
    wait,
)

from fedcoreml.client_sim.device import (
    DeviceData,
    DeviceStats,
    FaultyTrainer,
    RetryPolicy,
    SimulatedDevice,
    architecture_key,
    task_seed,
)
from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.client_sim.fleet import (
    FleetOptions,
    partition_dataset,
    pick_devices,
    run_fleet,
    split_holdout,
)
from fedcoreml.ios_bridge.channel import CHANNEL_OPTIONS
from fedcoreml.ios_bridge.datasets import Dataset, load_bundled_sample
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.device_client import GaveUpError, TrainResult
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.wire import device_pb2

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=5.0, rpc_timeout=20.0)
DEVICE_SEED = 7
WATCHDOG_SECONDS = 60.0


def run_device(
    fake: FakeCoordinator, data: DeviceData, stop: threading.Event | None = None, **kwargs
) -> DeviceStats:
    """Run one device to the end against ``fake``; a watchdog stops it if it hangs."""
    stop = stop or threading.Event()
    watchdog = threading.Timer(WATCHDOG_SECONDS, stop.set)
    watchdog.start()
    kwargs.setdefault("retry", FAST)
    try:
        with serve(fake) as address, grpc.insecure_channel(address, CHANNEL_OPTIONS) as channel:
            device = SimulatedDevice(
                channel, "phone-1", data, seed=DEVICE_SEED, stop=stop, **kwargs
            )
            return device.run()
    finally:
        watchdog.cancel()


# -- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> Dataset:
    return load_bundled_sample()


@pytest.fixture(scope="module")
def data(sample) -> DeviceData:
    return split_holdout(sample.x_train[:64], sample.y_train[:64], 0.1, seed=0)


def reference_training(model: bytes, data: DeviceData, task_id: str):
    emulator = CoreMLEmulator(spec_from_bytes(model))
    return emulator.train(
        data.x_train, data.y_train, epochs=1, batch_size=16, learning_rate=1e-3,
        seed=task_seed(DEVICE_SEED, task_id),
    )  # fmt: skip


# -- tests --------------------------------------------------------------------------------------


def test_split_holdout_keeps_a_tenth_aside(data):
    assert (data.num_train, data.num_eval) == (58, 6)
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64))


def test_pick_devices_is_seeded_and_independent_per_purpose():
    drop = pick_devices(20, 0.25, seed=3, purpose="drop")
    assert len(drop) == 5 and drop == pick_devices(20, 0.25, seed=3, purpose="drop")
    assert drop != pick_devices(20, 0.25, seed=3, purpose="slow")
    assert pick_devices(20, 0.0) == frozenset()


def test_architecture_key_ignores_parameters_only():
    spec_0, spec_1 = build_default_model(seed=0), build_default_model(seed=1)
    assert architecture_key(spec_0) == architecture_key(spec_1)
    assert architecture_key(spec_0) != architecture_key(model_zoo.handwritten_mlp())


def test_a_full_run_trains_evaluates_and_reuses_the_emulator(data):
    script = [
        wait(10),
        train("t1", MODEL_0, round_=1),
        evaluate("e1", MODEL_0, round_=1),
        train("t2", MODEL_1, round_=2),
    ]
    fake = FakeCoordinator(script, {"t1": MODEL_0, "e1": MODEL_0, "t2": MODEL_1})
    fake.break_downloads = 1  # the first download is cut after one chunk and must resume

    stats = run_device(fake, data)

    assert stats.finished and stats.error is None and not stats.dropped_out
    assert (stats.tasks_trained, stats.tasks_evaluated, stats.failures) == (2, 1, 0)
    assert stats.waits == 1 and stats.polls == 5
    assert stats.models_built == 1  # one architecture, one Keras model
    assert fake.download_offsets[:2] == [("t1", 0), ("t1", CHUNK)]
    assert stats.retries == 1

    for task_id, model in (("t1", MODEL_0), ("t2", MODEL_1)):
        header, params = fake.updates[("phone-1", task_id)]
        assert header.num_examples == data.num_train
        assert np.isfinite(header.loss) and 0.0 <= header.accuracy <= 1.0
        assert header.train_seconds > 0
        sent = get_parameters(spec_from_bytes(model))
        assert [name for name, _ in params] == [name for name, _ in sent]
        assert any(not np.array_equal(got, before) for (_, got), (_, before) in
                   zip(params, sent, strict=True))  # fmt: skip
        expected = reference_training(model, data, task_id)
        for (name, got), (_, want) in zip(params, expected.parameters, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)

    evaluation = fake.evaluations[("phone-1", "e1")]
    assert evaluation.num_examples == data.num_eval
    assert 0.0 <= evaluation.accuracy <= 1.0 and np.isfinite(evaluation.loss)
    fresh_loss, fresh_accuracy = CoreMLEmulator(spec_from_bytes(MODEL_0)).evaluate(
        data.x_eval, data.y_eval
    )  # the reused emulator really was loaded with the evaluated model's parameters
    assert evaluation.accuracy == pytest.approx(fresh_accuracy)
    assert evaluation.loss == pytest.approx(fresh_loss, rel=1e-4)
    assert stats.last_accuracy == pytest.approx(fresh_accuracy)


def test_it_waits_as_long_as_it_is_told(data):
    fake = FakeCoordinator([wait(60), wait(60), wait(60)], {})
    start = time.monotonic()
    stats = run_device(fake, data)
    assert stats.finished and stats.waits == 3
    assert fake.get_task_calls == 4
    assert time.monotonic() - start >= 0.18


def test_it_registers_again_when_the_session_is_unknown(data):
    fake = FakeCoordinator([wait(10)], {})
    fake.forget_sessions = 1
    stats = run_device(fake, data)
    assert stats.finished
    assert [r.device_id for r in fake.registrations] == ["phone-1", "phone-1"]
    assert fake.registrations[0].platform == "simulated"
    assert stats.registrations == 2


def test_it_retries_unavailable_and_deadline_exceeded(data):
    fake = FakeCoordinator([], {})
    fake.get_task_faults = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    stats = run_device(fake, data)
    assert stats.finished and stats.retries == 2 and fake.get_task_calls == 3


def test_it_gives_up_on_a_coordinator_that_stays_unavailable(data):
    fake = FakeCoordinator([], {})
    fake.get_task_faults = [grpc.StatusCode.UNAVAILABLE] * 10_000
    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, give_up_after=0.3)
    start = time.monotonic()
    with pytest.raises(GaveUpError, match="gave up"):
        run_device(fake, data, retry=retry)
    assert time.monotonic() - start < 5


def test_it_refuses_a_model_whose_sha256_does_not_match(data):
    script = [train("t1", MODEL_0, sha256="0" * 64)]
    fake = FakeCoordinator(script, {"t1": MODEL_0})
    stats = run_device(fake, data)
    assert stats.finished
    assert fake.updates == {}
    assert (stats.failures, stats.tasks_trained, stats.models_built) == (1, 0, 0)


def test_a_device_that_drops_out_never_submits(data):
    fake = FakeCoordinator([train("t1", MODEL_0)], {"t1": MODEL_0})
    stats = run_device(fake, data, drop_probability=1.0)
    assert stats.dropped_out and not stats.finished
    assert fake.download_offsets == [("t1", 0)]  # it did download
    assert fake.updates == {} and fake.get_task_calls == 1


@pytest.mark.parametrize(
    ("code", "level"),
    [(grpc.StatusCode.FAILED_PRECONDITION, logging.WARNING),
     (grpc.StatusCode.INVALID_ARGUMENT, logging.ERROR)],
)  # fmt: skip
def test_a_refused_submission_drops_the_task_and_goes_on(data, caplog, code, level):
    fake = FakeCoordinator([evaluate("e1", MODEL_0), wait(10)], {"e1": MODEL_0})
    fake.refuse_submissions = code
    with caplog.at_level(logging.INFO, logger="fedcoreml.device"):
        stats = run_device(fake, data)
    assert stats.finished and stats.failures == 1 and stats.tasks_evaluated == 0
    dropped = [r for r in caplog.records if "dropped task e1" in r.getMessage()]
    assert [r.levelno for r in dropped] == [level]
    assert code.name in dropped[0].getMessage()


def test_the_stop_event_ends_the_loop_promptly(data):
    fake = FakeCoordinator([wait(30_000)], {})
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    stats = run_device(fake, data, stop=stop)
    assert not stats.finished and stats.error is None
    assert time.monotonic() - start < 3


def test_a_fleet_runs_every_device_to_the_end(sample):
    small = Dataset(sample.x_train[:90], sample.y_train[:90], sample.x_test, sample.y_test)
    shares = partition_dataset(small, 3, "iid", seed=0)
    assert [s.num_train + s.num_eval for s in shares] == [30, 30, 30]
    fake = FakeCoordinator([wait(10), evaluate("e1", MODEL_0)], {"e1": MODEL_0})
    options = FleetOptions(seed=1, drop_devices={0}, slow_devices={2}, slowdown_seconds=0.2,
                           retry=FAST)  # fmt: skip
    with serve(fake) as address:
        stats = run_fleet(address, shares, options)
    assert [s.device_id for s in stats] == ["sim-000", "sim-001", "sim-002"]
    assert stats[0].dropped_out and not stats[0].finished
    assert all(s.finished and s.tasks_evaluated == 1 for s in stats[1:])
    assert set(fake.evaluations) == {("sim-001", "e1"), ("sim-002", "e1")}
    assert "last accuracy" in stats[1].summary()


def test_the_devices_command_runs_a_fleet(capsys):
    from fedcoreml.server.cli import main

    fake = FakeCoordinator([wait(10)], {})
    with serve(fake) as address:
        code = main(["devices", "--server", address, "--count", "2", "--give-up-after", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sim-000: trained 0" in out and "sim-001: trained 0" in out
    assert out.count("finished") == 2


def test_a_slow_phone_trains_the_given_factor_as_long():
    """--slow-factor 4: after each training, sleep three times that training's own wall time."""

    class Trainer:
        def train(self, model, task):
            return TrainResult([], 10, 0.5, 0.5, 0.25)

        def evaluate(self, model, task):
            raise AssertionError("not asked")

    slept: list[float] = []
    slow = FaultyTrainer(Trainer(), slowdown_factor=4.0, sleep=slept.append)
    slow.train(b"", device_pb2.TrainTask(task_id="t", round=1))
    assert slept == [0.75]
    FaultyTrainer(Trainer(), sleep=slept.append).train(b"", device_pb2.TrainTask(task_id="u"))
    assert slept == [0.75]  # an ordinary phone does not sleep
    with pytest.raises(ValueError, match="slowdown_factor must be >= 1"):
        FaultyTrainer(Trainer(), slowdown_factor=0.5, sleep=slept.append)
