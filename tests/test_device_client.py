"""DeviceClient, the reference device-side client, against the fake coordinator (no TensorFlow).

A deterministic trainer returns the received parameters plus a known offset, so every test
knows exactly what must arrive at the coordinator.
"""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import numpy as np
import pytest
from fake_coordinator import MODEL_0, MODEL_1, FakeCoordinator, evaluate, serve, train, wait

from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.device_client import (
    DeviceClient,
    EvaluationResult,
    FailedPreconditionError,
    GaveUpError,
    InvalidArgumentError,
    ModelVerificationError,
    NotFoundError,
    RefusedError,
    ResourceExhaustedError,
    RetryPolicy,
    TaskAbandonedError,
    TrainResult,
    UnauthenticatedError,
    refusal_from,
)
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.wire import device_pb2

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=5.0, rpc_timeout=20.0)
OFFSET = np.float32(0.25)


class OffsetTrainer:
    """Returns every received weight and bias plus OFFSET; evaluation reports fixed metrics."""

    def __init__(self, abandon: bool = False) -> None:
        self.trained: list[str] = []
        self.abandon = abandon

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        if self.abandon:
            raise TaskAbandonedError("the user started a game")
        self.trained.append(task.task_id)
        received = get_parameters(spec_from_bytes(model))
        return TrainResult([(n, v + OFFSET) for n, v in received], 42, 0.7, 0.6, 0.01)

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        return EvaluationResult(7, 0.4, 0.9)


def run_client(fake: FakeCoordinator, trainer=None, stop=None, **kwargs) -> DeviceClient:
    stop = stop or threading.Event()
    watchdog = threading.Timer(60, stop.set)
    watchdog.start()
    kwargs.setdefault("retry", FAST)
    try:
        with serve(fake) as address, open_channel(address) as channel:
            client = DeviceClient(channel, "phone-1", trainer or OffsetTrainer(), stop=stop,
                                  **kwargs)  # fmt: skip
            client.run()
            return client
    finally:
        watchdog.cancel()


def test_every_weight_and_bias_comes_back_in_chunks_within_the_limit():
    fake = FakeCoordinator([train("t1", MODEL_0), evaluate("e1", MODEL_1)],
                           {"t1": MODEL_0, "e1": MODEL_1})  # fmt: skip
    client = run_client(fake)
    header, params = fake.updates[("phone-1", "t1")]
    expected = [(n, v + OFFSET) for n, v in get_parameters(spec_from_bytes(MODEL_0))]
    assert [n for n, _ in params] == [n for n, _ in expected]
    assert {n.split(".")[1] for n, _ in params} == {"weights", "bias"}
    for (name, got), (_, want) in zip(params, expected, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert (header.num_examples, header.loss, header.accuracy) == (42, pytest.approx(0.7),
                                                                  pytest.approx(0.6))  # fmt: skip
    assert max(fake.update_chunks) <= client.pacing.chunk_bytes
    assert all(size % 4 == 0 for size in fake.update_chunks)
    assert fake.evaluations[("phone-1", "e1")].accuracy == pytest.approx(0.9)
    stats = client.stats
    assert stats.finished and (stats.tasks_trained, stats.tasks_evaluated) == (1, 1)


def test_a_cut_download_resumes_from_its_offset_and_verifies():
    fake = FakeCoordinator([train("t1", MODEL_0)], {"t1": MODEL_0})
    fake.break_downloads = 2
    client = run_client(fake)
    assert fake.download_offsets[:3] == [("t1", 0), ("t1", 256 * 1024), ("t1", 512 * 1024)]
    assert client.stats.retries == 2 and client.stats.tasks_trained == 1


def test_a_corrupted_download_fails_the_sha256_check_and_is_fetched_again():
    fake = FakeCoordinator([train("t1", MODEL_0)], {"t1": MODEL_0})
    fake.corrupt_downloads = 1
    client = run_client(fake)
    assert [offset for _, offset in fake.download_offsets] == [0, 0]
    assert client.stats.tasks_trained == 1 and client.stats.failures == 0


def test_a_model_that_never_verifies_is_dropped_and_nothing_submitted():
    fake = FakeCoordinator([train("t1", MODEL_0, sha256="0" * 64), wait(10)], {"t1": MODEL_0})
    trainer = OffsetTrainer()
    client = run_client(fake, trainer)
    assert trainer.trained == [] and fake.updates == {}
    assert client.stats.failures == 1 and client.stats.finished


def test_retry_after_of_a_rate_limit_is_honoured():
    fake = FakeCoordinator([], {})
    fake.throttle_get_task_ms = [300]
    client = run_client(fake)
    first, second = fake.get_task_times[:2]
    assert second - first >= 0.29
    assert client.stats.throttled == 1 and client.stats.retries == 0


def test_wait_and_long_poll_hints_are_honoured():
    fake = FakeCoordinator([wait(150), wait(150)], {})
    fake.long_poll_ms = 90_000  # longer than the client's default call deadline
    start = time.monotonic()
    client = run_client(fake)
    times = fake.get_task_times
    assert all(b - a >= 0.14 for a, b in itertools.pairwise(times))
    assert time.monotonic() - start < 10 and client.stats.waits == 2


@pytest.mark.parametrize(
    ("code", "cls"),
    [(grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
     (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
     (grpc.StatusCode.NOT_FOUND, NotFoundError)],
)  # fmt: skip
def test_a_refused_submission_is_a_typed_error_with_status_and_message(code, cls):
    fake = FakeCoordinator([], {"t1": MODEL_0})
    fake.refuse_submissions = code
    with serve(fake) as address, open_channel(address) as channel:
        client = DeviceClient(channel, "phone-1", OffsetTrainer(), retry=FAST)
        client.register()
        result = OffsetTrainer().train(MODEL_0, device_pb2.TrainTask(task_id="t1"))
        with pytest.raises(cls) as refused:
            client.submit_update("t1", result)
    assert refused.value.code == code and refused.value.message == "injected refusal"
    assert isinstance(refused.value, RefusedError)


def test_a_refused_submission_drops_the_task_and_the_run_goes_on():
    fake = FakeCoordinator([train("t1", MODEL_0), wait(10)], {"t1": MODEL_0})
    fake.refuse_submissions = grpc.StatusCode.FAILED_PRECONDITION
    client = run_client(fake)
    assert client.stats.finished and client.stats.failures == 1
    assert client.stats.refusals == {"FAILED_PRECONDITION": 1}


def test_an_abandoned_task_submits_nothing():
    fake = FakeCoordinator([train("t1", MODEL_0)], {"t1": MODEL_0})
    client = run_client(fake, OffsetTrainer(abandon=True))
    assert fake.updates == {} and client.stats.failures == 1 and client.stats.finished


def test_an_unknown_session_registers_again():
    fake = FakeCoordinator([wait(10)], {})
    fake.forget_sessions = 1
    client = run_client(fake)
    assert client.stats.registrations == 2 and client.stats.finished


def test_a_task_unknown_at_download_is_dropped_for_the_next_one():
    """protos/README.md: NOT_FOUND for a task: drop it and call GetTask (same session)."""
    fake = FakeCoordinator([train("forgotten", MODEL_0), train("t2", MODEL_1)], {"t2": MODEL_1})
    trainer = OffsetTrainer()
    client = run_client(fake, trainer)
    assert trainer.trained == ["t2"] and list(fake.updates) == [("phone-1", "t2")]
    assert client.stats.failures == 1 and client.stats.refusals == {"NOT_FOUND": 1}
    assert client.stats.registrations == 1 and client.stats.finished


@pytest.mark.parametrize("rpc", ["DownloadModel", "SubmitUpdate"])
def test_a_coordinator_restarted_under_a_task_is_met_by_dropping_it_and_registering(rpc):
    """Killed mid-call and restarted: the retry meets NOT_FOUND (the session, and the task, are
    unknown now); the device drops the task, registers again and does the next task it gets."""
    fake = FakeCoordinator([train("t1", MODEL_0), train("t2", MODEL_1)],
                           {"t1": MODEL_0, "t2": MODEL_1})  # fmt: skip
    fake.restart_at = [rpc]
    trainer = OffsetTrainer()
    client = run_client(fake, trainer)
    # t1 was lost with the old coordinator (trained, when the restart hit its submission)
    assert trainer.trained == (["t1", "t2"] if rpc == "SubmitUpdate" else ["t2"])
    assert list(fake.updates) == [("phone-1", "t2")]
    assert client.stats.registrations == 2 and client.stats.failures == 1
    # UNAVAILABLE retried once; NOT_FOUND for the task's call, then for GetTask's session
    assert client.stats.refusals == {"UNAVAILABLE": 1, "NOT_FOUND": 2}
    assert client.stats.finished


def test_unavailable_is_retried_with_backoff_until_give_up():
    fake = FakeCoordinator([], {})
    fake.get_task_faults = [grpc.StatusCode.UNAVAILABLE] * 10_000
    retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, give_up_after=0.3)
    with pytest.raises(GaveUpError, match="gave up"):
        run_client(fake, retry=retry)


def test_unauthenticated_stops_the_client():
    fake = FakeCoordinator([], {})
    fake.get_task_faults = [grpc.StatusCode.UNAUTHENTICATED]
    with pytest.raises(UnauthenticatedError):
        run_client(fake)


def test_stop_cancels_promptly_without_submitting():
    fake = FakeCoordinator([wait(30_000)], {})
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    client = run_client(fake, stop=stop)
    assert time.monotonic() - start < 3 and not client.stats.finished and fake.updates == {}


def test_refusal_from_maps_every_status_and_the_retry_after():
    class Failed(grpc.RpcError):
        def __init__(self, code, trailing=()):
            self._code, self._trailing = code, trailing

        def code(self):
            return self._code

        def details(self):
            return "why"

        def trailing_metadata(self):
            return self._trailing

    throttled = refusal_from("GetTask", Failed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               (("retry-after-ms", "1500"),)))  # fmt: skip
    assert isinstance(throttled, ResourceExhaustedError) and throttled.retry_after_s == 1.5
    oversized = refusal_from("SubmitUpdate", Failed(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert oversized.retry_after_s is None
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        refusal = refusal_from("Register", Failed(code))
        assert refusal.code == code and refusal.message == "why" and code.name in str(refusal)


def test_model_verification_error_names_both_digests():
    fake = FakeCoordinator([], {"t1": MODEL_0})
    with serve(fake) as address, open_channel(address) as channel:
        client = DeviceClient(channel, "phone-1", retry=FAST)
        client.register()
        ref = device_pb2.ModelRef(version=0, sha256="ab" * 32, size_bytes=len(MODEL_0))
        with pytest.raises(ModelVerificationError, match="sha256 mismatch"):
            client.download_model("t1", ref)
