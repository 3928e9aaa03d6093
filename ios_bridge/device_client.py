"""DeviceClient: the reference device side of the fedcoreml protocol, driven by a trainer.

What an iOS app does, in Python, over a ``grpc.Channel``: register; ask for work, honouring
``Wait.retry_after_ms``, the pacing hints and the long poll; download the task's ``.mlmodel``,
resuming from the last byte after a dropped stream and verifying its size and sha256; hand it to
a :class:`Trainer`; stream every updatable weight and bias back in chunks within the server's
limits; evaluate when asked; and back off with jitter while the coordinator is unreachable.
The Swift kit (``ios_bridge/swift``) mirrors it state for state::

    REGISTER -> POLL -> (wait) POLL | (train/evaluate) DOWNLOAD -> WORK -> SUBMIT -> POLL
                     | (finished) DONE

Every refusal surfaces as a typed :class:`RefusedError` carrying its gRPC status and message, and
the contract's recovery rules (``protos/README.md``) are applied by :meth:`DeviceClient.run`:

- ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED``: the same call again, with exponential backoff and
  jitter (``RetryPolicy``), until ``give_up_after`` seconds of failure (:class:`GaveUpError`);
- ``RESOURCE_EXHAUSTED`` with ``retry-after-ms``: the same call again after that long;
- ``NOT_FOUND`` on ``GetTask`` (unknown session, e.g. a restarted coordinator): register again;
- ``NOT_FOUND``, ``PERMISSION_DENIED``, ``FAILED_PRECONDITION`` on a task: drop the task and ask
  for the next one (``GetTask`` then re-registers if the session is gone too);
- ``UNAUTHENTICATED``: stop (:class:`UnauthenticatedError`), retrying cannot help;
- anything else on a task (``INVALID_ARGUMENT``, ...): a bug on one side; the task is dropped.

The low-level calls (:meth:`register`, :meth:`get_task`, :meth:`download_model`,
:meth:`submit_update`, :meth:`submit_update_stream`, :meth:`submit_evaluation`) apply the retry
rules but nothing else, for tests and tools that script the protocol step by step.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import numpy as np

from fedcoreml.ios_bridge.channel import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    RETRY_AFTER_KEY,
    bearer_metadata,
)
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

__all__ = [
    "ClientStats",
    "DeviceClient",
    "EvaluationResult",
    "GaveUpError",
    "ModelVerificationError",
    "RefusedError",
    "RetryPolicy",
    "StoppedError",
    "TaskAbandonedError",
    "TrainResult",
    "Trainer",
    "refusal_from",
]

log = logging.getLogger("fedcoreml.device")

T = TypeVar("T")
Parameters = list[tuple[str, np.ndarray]]
Task = device_pb2.TrainTask | device_pb2.EvaluateTask

DEFAULT_POLL_SECONDS = 1.0  # when neither Wait.retry_after_ms nor the pacing hints say
LONG_POLL_MARGIN_S = 5.0  # a GetTask deadline beyond the server's long poll
MAX_SESSION_LOSSES = 5  # NOT_FOUND on GetTask right after registering, this many times in a row
DOWNLOAD_ATTEMPTS = 2  # a model that fails verification is fetched once more from the start
_FRAMING_BYTES = 64 * 1024  # room left in a message for a tensor chunk's name, shape and framing


# -- errors -----------------------------------------------------------------------------------


class DeviceClientError(FedCoreMLError):
    """The device cannot go on, or a call did not do what was asked."""


class RefusedError(DeviceClientError):
    """The coordinator answered a call with a non-OK status: ``code`` and its ``message``."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, rpc: str, message: str, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        super().__init__(f"{rpc} refused ({self.code.name}): {message}")
        self.rpc = rpc
        self.message = message


class InvalidArgumentError(RefusedError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RefusedError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDeniedError(RefusedError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(RefusedError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(RefusedError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(RefusedError):
    """Over the device's rate limit (``retry_after_s`` set) or a message over the size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, rpc: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(rpc, message)
        self.retry_after_s = retry_after_s


class UnauthenticatedError(RefusedError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(RefusedError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RefusedError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[RefusedError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        FailedPreconditionError,
        OutOfRangeError,
        UnauthenticatedError,
        UnavailableError,
        DeadlineExceededError,
    )
}
#: Retry the same call after these, with backoff (the coordinator is unreachable or restarting).
TRANSIENT = (UnavailableError, DeadlineExceededError)
#: The task is no longer this device's to do: drop it and ask for the next one.
TASK_GONE = (NotFoundError, FailedPreconditionError, PermissionDeniedError)


def refusal_from(rpc: str, exc: grpc.RpcError) -> RefusedError:
    """The typed :class:`RefusedError` for a failed call."""
    code, message = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(rpc, message, _retry_after_s(exc))
    cls = _BY_CODE.get(code)
    return cls(rpc, message) if cls is not None else RefusedError(rpc, message, code)


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    trailing = getattr(exc, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


class ModelVerificationError(DeviceClientError):
    """A downloaded model whose size or sha256 is not what the task announced."""


class GaveUpError(DeviceClientError):
    """The coordinator stayed unreachable for ``RetryPolicy.give_up_after`` seconds."""


class TaskAbandonedError(DeviceClientError):
    """Raised by a trainer to give up the current task (nothing is submitted; work goes on)."""


class StoppedError(Exception):
    """The client's stop event was set."""


# -- what the client is given -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """A trained model's updatable parameters (Core ML layout, every weight and bias)."""

    parameters: Parameters
    num_examples: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class EvaluationResult:
    """Loss and accuracy of a model on the device's held-out examples (never trained on)."""

    num_examples: int
    loss: float
    accuracy: float


class Trainer(Protocol):
    """Trains and evaluates a downloaded ``.mlmodel`` on the device's own data."""

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult: ...

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` and the per-call deadline.

    The n-th retry of one call waits ``min(max_backoff, initial_backoff * 2**n)`` seconds, of
    which the upper half is random jitter; after ``give_up_after`` seconds of failing the client
    raises :class:`GaveUpError`.
    """

    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    give_up_after: float = 300.0
    rpc_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("initial_backoff", "max_backoff", "give_up_after", "rpc_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class ClientStats:
    """What one device did: tasks, failures, retries and its last results."""

    device_id: str
    registrations: int = 0
    polls: int = 0  # GetTask answers received
    waits: int = 0
    tasks_trained: int = 0  # updates the coordinator accepted
    tasks_evaluated: int = 0  # evaluations the coordinator accepted
    failures: int = 0  # tasks dropped: refused, bad model, abandoned
    retries: int = 0  # calls retried after UNAVAILABLE / DEADLINE_EXCEEDED
    throttled: int = 0  # calls retried after RESOURCE_EXHAUSTED with a retry-after
    last_round: int | None = None
    last_train_accuracy: float | None = None
    last_accuracy: float | None = None  # on the held-out split, from the last evaluate task
    finished: bool = False
    error: str | None = None
    refusals: dict[str, int] = field(default_factory=dict)  # status name -> count


class _Backoff:
    """One streak of retries: exponential delays with jitter, and the give-up clock."""

    def __init__(self, policy: RetryPolicy, rng: random.Random, sleep: Callable[[float], None]):
        self._policy = policy
        self._rng = rng
        self._sleep = sleep
        self._attempt = 0
        self._first_failure: float | None = None

    def reset(self) -> None:
        self._attempt = 0
        self._first_failure = None

    def wait(self, device_id: str, what: str, refusal: RefusedError) -> None:
        """Sleep before the next try, or raise GaveUpError once the failure has lasted too long."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        failing_for = now - self._first_failure
        left = self._policy.give_up_after - failing_for
        if left <= 0:
            raise GaveUpError(
                f"gave up after {failing_for:.1f} s: the coordinator did not answer {what} "
                f"({refusal.code.name}: {refusal.message}); is it running and reachable?"
            )
        ceiling = min(self._policy.max_backoff, self._policy.initial_backoff * 2**self._attempt)
        delay = min(left, ceiling / 2 + self._rng.uniform(0, ceiling / 2))
        self._attempt += 1
        log.warning(
            "%s: %s failed (%s); retry %d in %.2f s", device_id, what, refusal.code.name,
            self._attempt, delay,
        )  # fmt: skip
        self._sleep(delay)


# -- the client -------------------------------------------------------------------------------


class DeviceClient:
    """One device's side of a run over ``channel``; :meth:`run` returns when the run is finished.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. Setting ``stop`` ends
    :meth:`run` promptly (within a training at most). Random choices (jitter) follow ``seed``.
    ``on_call(rpc, seconds, refusal)`` is told of every call made, for measurements.
    ``capabilities_provider``, when given, is asked for the device's current capabilities
    (charging, network, battery) before Register and every GetTask; otherwise the fixed
    ``capabilities`` are sent (default: charging, unmetered, battery full).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        device_id: str,
        trainer: Trainer | None = None,
        *,
        platform: str = "python",
        os_version: str = "",
        app_version: str = "",
        capabilities: device_pb2.DeviceCapabilities | None = None,
        capabilities_provider: Callable[[], device_pb2.DeviceCapabilities] | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        stop: threading.Event | None = None,
        seed: int | str = 0,
        stats: ClientStats | None = None,
        on_call: Callable[[str, float, RefusedError | None], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.trainer = trainer
        self.stub = device_pb2_grpc.DeviceServiceStub(channel)
        self.metadata = bearer_metadata(token) if token else None
        self.retry = retry if retry is not None else RetryPolicy()
        self.stop = stop if stop is not None else threading.Event()
        self.stats = stats if stats is not None else ClientStats(device_id)
        self.capabilities = capabilities or device_pb2.DeviceCapabilities(
            charging=True, unmetered_network=True, battery_level=1.0
        )
        self._capabilities_provider = capabilities_provider
        self._registration = device_pb2.RegisterRequest(
            device_id=device_id,
            platform=platform,
            os_version=os_version,
            app_version=app_version,
        )
        self._jitter = random.Random(f"{seed}:jitter")
        self._on_call = on_call
        self.session_id = ""
        self.pacing = device_pb2.PacingHints()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> ClientStats:
        """Register and work until the coordinator says the run is finished (or ``stop``).

        Raises GaveUpError, UnauthenticatedError or the RefusedError of a failed registration (also
        recorded in ``stats.error``); exceptions a trainer raises, other than
        :class:`TaskAbandonedError`, propagate unchanged.
        """
        try:
            self.register()
            while not self._step():
                pass
        except StoppedError:
            log.info("%s: stopped", self.device_id)
        except DeviceClientError as exc:
            self.stats.error = str(exc)
            log.error("%s: %s", self.device_id, exc)
            raise
        return self.stats

    def _step(self) -> bool:
        """One GetTask and what it asks for; True once the run is finished."""
        response = self.next_task()
        kind = response.WhichOneof("task")
        if kind == "finished":
            self.stats.finished = True
            log.info(
                "%s: run finished (%s); final model v%d", self.device_id,
                response.finished.reason or "no reason given",
                response.finished.final_model.version,
            )  # fmt: skip
            return True
        if kind in ("train", "evaluate"):
            self._do_task(kind, getattr(response, kind))
        else:  # a Wait, or an empty answer from a newer server: ask again later
            self.stats.waits += 1
            self.sleep(self.poll_seconds(response.wait.retry_after_ms))
        return False

    def _do_task(self, kind: str, task: Task) -> None:
        log.info(
            "%s: %s task %s, round %d, model v%d (%d bytes)", self.device_id, kind,
            task.task_id, task.round, task.model.version, task.model.size_bytes,
        )  # fmt: skip
        received = time.monotonic()
        try:
            model = self.download_model(task.task_id, task.model)
            if kind == "train":
                self._train(task, model, received)
            else:
                self._evaluate(task, model)
        except (RefusedError, ModelVerificationError, TaskAbandonedError) as exc:
            if isinstance(exc, UnauthenticatedError):
                raise
            self.stats.failures += 1
            bug = isinstance(exc, RefusedError) and not isinstance(exc, TASK_GONE)
            log.log(
                logging.ERROR if bug else logging.WARNING,
                "%s: dropped task %s: %s%s", self.device_id, task.task_id, exc,
                " (a bug in this device or the coordinator)" if bug else "",
            )  # fmt: skip

    def _train(self, task: device_pb2.TrainTask, model: bytes, received: float) -> None:
        result = self._trainer().train(model, task)
        if not _all_finite(result):
            raise TaskAbandonedError(f"training diverged (loss {result.loss}); not submitting")
        self._warn_if_late(task.deadline_ms, time.monotonic() - received)
        response = self.submit_update(task.task_id, result)
        self.stats.tasks_trained += 1
        self.stats.last_round = response.round
        self.stats.last_train_accuracy = result.accuracy
        log.info("%s: update for task %s accepted (round %d)", self.device_id, task.task_id,
                 response.round)  # fmt: skip

    def _evaluate(self, task: device_pb2.EvaluateTask, model: bytes) -> None:
        result = self._trainer().evaluate(model, task)
        self.submit_evaluation(task.task_id, result)
        self.stats.tasks_evaluated += 1
        self.stats.last_round = task.round
        self.stats.last_accuracy = result.accuracy

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise TaskAbandonedError("this client has no trainer")
        return self.trainer

    def _warn_if_late(self, deadline_ms: int, seconds: float) -> None:
        if deadline_ms and seconds > deadline_ms / 1000:
            log.warning(
                "%s: submitting %.1f s after the task's %.1f s deadline; it may be refused",
                self.device_id, seconds, deadline_ms / 1000,
            )  # fmt: skip

    # -- low-level calls ----------------------------------------------------------------------

    def current_capabilities(self) -> device_pb2.DeviceCapabilities:
        """What the device reports now: the provider's answer, or the fixed capabilities."""
        if self._capabilities_provider is None:
            return self.capabilities
        return self._capabilities_provider()

    def register(self) -> device_pb2.RegisterResponse:
        """Register (again); keeps the session id and the pacing hints."""
        request = device_pb2.RegisterRequest()
        request.CopyFrom(self._registration)
        request.capabilities.CopyFrom(self.current_capabilities())
        response = self._unary("Register", self.stub.Register, request)
        self.session_id = response.session_id
        self.pacing = response.pacing
        self.stats.registrations += 1
        log.info(
            "%s: registered (poll %d ms, long poll %d ms, session ttl %d ms)", self.device_id,
            self.pacing.poll_interval_ms, self.pacing.long_poll_ms, self.pacing.session_ttl_ms,
        )  # fmt: skip
        return response

    def get_task(self) -> device_pb2.GetTaskResponse:
        """One GetTask answer (the call is given a deadline beyond the server's long poll)."""
        request = device_pb2.GetTaskRequest(
            session_id=self.session_id, capabilities=self.current_capabilities()
        )
        timeout = max(self.retry.rpc_timeout, self.pacing.long_poll_ms / 1000 + LONG_POLL_MARGIN_S)
        response = self._unary("GetTask", self.stub.GetTask, request, timeout)
        self.stats.polls += 1
        return response

    def next_task(self) -> device_pb2.GetTaskResponse:
        """The next GetTask answer, registering again whenever the session is unknown."""
        losses = 0
        while True:
            try:
                return self.get_task()
            except NotFoundError as exc:
                losses += 1
                if losses > MAX_SESSION_LOSSES:
                    raise DeviceClientError(
                        f"the coordinator forgot the session {losses} times in a row right "
                        f"after registering ({exc.message})"
                    ) from None
                log.warning("%s: session unknown to the coordinator (%s); registering again",
                            self.device_id, exc.message)  # fmt: skip
                if losses > 1:
                    self.sleep(self.poll_seconds())
                self.register()

    def download_model(self, task_id: str, ref: device_pb2.ModelRef) -> bytes:
        """The task's whole ``.mlmodel``, resuming after dropped streams, checked against ``ref``.

        Bytes that fail the size or sha256 check are thrown away and fetched once more from the
        start; ModelVerificationError if they fail again.
        """
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            data = self._download_once(task_id, ref)
            try:
                _verify_model(data, ref)
                return bytes(data)
            except ModelVerificationError as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise
                log.warning("%s: %s; downloading again", self.device_id, exc)
        raise AssertionError("unreachable")

    def _download_once(self, task_id: str, ref: device_pb2.ModelRef) -> bytearray:
        """The task's model bytes as the coordinator sends them, resuming after dropped streams."""
        data = bytearray()
        backoff = _Backoff(self.retry, self._jitter, self.sleep)
        while True:
            self.check_stop()
            request = device_pb2.DownloadModelRequest(
                session_id=self.session_id, task_id=task_id, offset=len(data)
            )
            begin = time.perf_counter()
            stream = self.stub.DownloadModel(
                request, timeout=self.retry.rpc_timeout, metadata=self.metadata
            )
            try:
                for chunk in stream:
                    _append_chunk(data, chunk, ref)
                    backoff.reset()
                    self.check_stop()
                self._observe("DownloadModel", begin, None)
                break
            except grpc.RpcError as exc:
                refusal = refusal_from("DownloadModel", exc)
                self._observe("DownloadModel", begin, refusal)
                what = f"DownloadModel of task {task_id} (resuming at byte {len(data)})"
                if not self._should_retry(what, refusal, backoff):
                    raise refusal from None
            finally:
                stream.cancel()  # a no-op once the stream has ended
        return data

    def submit_update(
        self, task_id: str, result: TrainResult, chunk_bytes: int | None = None
    ) -> device_pb2.SubmitUpdateResponse:
        """Stream ``result``'s tensors (header first) in chunks within the server's limits."""
        header = UpdateHeader(
            session_id=self.session_id,
            task_id=task_id,
            num_examples=result.num_examples,
            loss=result.loss,
            accuracy=result.accuracy,
            train_seconds=result.seconds,
        )
        size = chunk_bytes or self.chunk_bytes()
        return self.submit_update_stream(lambda: encode_update(header, result.parameters, size))

    def submit_update_stream(
        self, messages: Callable[[], Iterable[device_pb2.UpdateChunk]]
    ) -> device_pb2.SubmitUpdateResponse:
        """A SubmitUpdate of the messages ``messages()`` yields (called again for a retry)."""
        response = self._call(
            "SubmitUpdate",
            lambda: self.stub.SubmitUpdate(
                iter(messages()), timeout=self.retry.rpc_timeout, metadata=self.metadata
            ),
        )
        if not response.accepted:
            raise DeviceClientError("the coordinator did not accept the update")
        return response

    def submit_evaluation(
        self, task_id: str, result: EvaluationResult
    ) -> device_pb2.SubmitEvaluationResponse:
        request = device_pb2.SubmitEvaluationRequest(
            session_id=self.session_id,
            task_id=task_id,
            num_examples=result.num_examples,
            loss=result.loss,
            accuracy=result.accuracy,
        )
        response = self._unary("SubmitEvaluation", self.stub.SubmitEvaluation, request)
        if not response.accepted:
            raise DeviceClientError("the coordinator did not accept the evaluation")
        return response

    # -- pacing, retries, stopping ------------------------------------------------------------

    def chunk_bytes(self) -> int:
        """Tensor slice size: the coordinator's preference, never over its message limit."""
        limit = (self.pacing.max_message_bytes or MAX_MESSAGE_BYTES) - _FRAMING_BYTES
        preferred = self.pacing.chunk_bytes or DEFAULT_CHUNK_BYTES
        return max(4, min(preferred, limit) // 4 * 4)

    def poll_seconds(self, retry_after_ms: int = 0) -> float:
        """How long to wait before asking again: the server's hint, else its poll interval."""
        millis = retry_after_ms or self.pacing.poll_interval_ms
        return millis / 1000 if millis else DEFAULT_POLL_SECONDS

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise StoppedError

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (StoppedError) when the client is stopped."""
        if self.stop.wait(max(0.0, seconds)):
            raise StoppedError

    def _unary(self, rpc: str, method: Callable[..., T], request: object, timeout=None) -> T:
        return self._call(
            rpc,
            lambda: method(
                request, timeout=timeout or self.retry.rpc_timeout, metadata=self.metadata
            ),
        )

    def _call(self, rpc: str, call: Callable[[], T]) -> T:
        """``call()``, retried while it fails with a transient status or a rate limit."""
        backoff = _Backoff(self.retry, self._jitter, self.sleep)
        while True:
            self.check_stop()
            begin = time.perf_counter()
            try:
                result = call()
            except grpc.RpcError as exc:
                refusal = refusal_from(rpc, exc)
                self._observe(rpc, begin, refusal)
                if not self._should_retry(rpc, refusal, backoff):
                    raise refusal from None
                continue
            self._observe(rpc, begin, None)
            return result

    def _should_retry(self, what: str, refusal: RefusedError, backoff: _Backoff) -> bool:
        """After a failed call: sleep and say True to retry it, or False to raise ``refusal``."""
        self.stats.refusals[refusal.code.name] = self.stats.refusals.get(refusal.code.name, 0) + 1
        if isinstance(refusal, ResourceExhaustedError) and refusal.retry_after_s is not None:
            self.stats.throttled += 1
            delay = min(refusal.retry_after_s, self.retry.give_up_after)  # as long as it asks
            log.info("%s: %s throttled by the coordinator; retrying in %.3f s", self.device_id,
                     what, delay)  # fmt: skip
            self.sleep(delay)
            return True
        if not isinstance(refusal, TRANSIENT):
            return False
        self.stats.retries += 1
        backoff.wait(self.device_id, what, refusal)
        return True

    def _observe(self, rpc: str, begin: float, refusal: RefusedError | None) -> None:
        if self._on_call is not None:
            self._on_call(rpc, time.perf_counter() - begin, refusal)


def _append_chunk(data: bytearray, chunk: device_pb2.ModelChunk, ref: device_pb2.ModelRef) -> None:
    if chunk.offset != len(data):
        raise ModelVerificationError(f"model chunk at byte {chunk.offset}, expected {len(data)}")
    if chunk.total_size != ref.size_bytes:
        raise ModelVerificationError(
            f"the download is {chunk.total_size} bytes but the task announced {ref.size_bytes}"
        )
    if len(data) + len(chunk.data) > ref.size_bytes:
        raise ModelVerificationError(f"the download runs past the announced {ref.size_bytes} bytes")
    data.extend(chunk.data)


def _verify_model(data: bytearray, ref: device_pb2.ModelRef) -> None:
    if len(data) != ref.size_bytes:
        raise ModelVerificationError(
            f"downloaded {len(data)} bytes but the task announced {ref.size_bytes}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256.lower():
        raise ModelVerificationError(
            f"sha256 mismatch: the model hashes to {digest} but the task announced "
            f"{ref.sha256 or '(none)'}; not using it"
        )


def _all_finite(result: TrainResult) -> bool:
    return bool(np.isfinite(result.loss)) and all(
        np.isfinite(value).all() for _, value in result.parameters
    )
