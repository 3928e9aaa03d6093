"""A simulated iPhone: speaks the device protocol over gRPC and trains with the Core ML emulator.

:class:`SimulatedDevice` behaves like the iOS app described in ``protos/README.md``. It talks to
the coordinator only through a ``grpc.Channel``: it registers, polls ``GetTask``, downloads the
task's ``.mlmodel`` in chunks (resuming from the last byte after a broken stream), checks its
size and sha256 against the task's ``ModelRef``, trains or evaluates it on its own data with
:class:`~fedcoreml.client_sim.emulator.CoreMLEmulator`, and submits the result, until the
coordinator says the run is finished.

Status codes are handled as the contract says: ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` retry the
same call with exponential backoff and jitter (giving up after ``RetryPolicy.give_up_after``
seconds of failure); ``NOT_FOUND`` on ``GetTask`` registers again; ``NOT_FOUND``,
``PERMISSION_DENIED`` and ``FAILED_PRECONDITION`` on a task drop the task and ask for the next;
``INVALID_ARGUMENT`` (and ``RESOURCE_EXHAUSTED``, ``OUT_OF_RANGE``) are logged as a bug and drop
the task. Two more come from an authenticating gateway: ``UNAUTHENTICATED`` (a missing, unknown or
revoked token) ends the device with :class:`DeviceError`, and ``RESOURCE_EXHAUSTED`` carrying a
``retry-after-ms`` trailing metadata (the device's rate limit) waits that long and retries the
same call. With a ``token``, every call carries ``authorization: Bearer <token>`` metadata.

For tests and demonstrations a device can drop out (``drop_probability``: after downloading a
task's model it vanishes without submitting, as a phone that loses power would) or straggle
(``slowdown_seconds`` of sleep before each submission).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import TypeVar

import grpc
import numpy as np

from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.ios_bridge.channel import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    RETRY_AFTER_KEY,
    bearer_metadata,
)
from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, strip_parameters
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

__all__ = [
    "PLATFORM",
    "DeviceData",
    "DeviceError",
    "DeviceStats",
    "RetryPolicy",
    "SimulatedDevice",
    "architecture_key",
    "task_seed",
]

log = logging.getLogger("fedcoreml.device")

PLATFORM = "simulated"
#: Retry the same call after these, with backoff (the coordinator is unreachable or restarting).
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: The task is no longer ours to do: drop it and ask for the next one.
TASK_GONE_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
#: The coordinator says the request itself was wrong: a bug on one side or the other.
BUG_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
DEFAULT_POLL_SECONDS = 1.0  # when neither Wait.retry_after_ms nor the pacing hints say
MAX_SESSION_LOSSES = 5  # NOT_FOUND on GetTask right after registering, this many times in a row
_FRAMING_BYTES = 64 * 1024  # room left in a message for a tensor chunk's name, shape and framing
_STOP_POLL_SECONDS = 0.1

# Building Keras graphs from several threads at once is not something Keras promises to support.
_BUILD_LOCK = threading.Lock()
# Devices that are not given a semaphore share this one: one training at a time per process.
_DEFAULT_TRAINING_SLOTS = threading.Semaphore(1)

T = TypeVar("T")


@dataclass(frozen=True)
class Poison:
    """A malicious device's update, for robustness tests and benchmarks.

    ``scale:F`` sends ``received + F * (trained - received)`` (e.g. F = -10: a boosted,
    sign-flipped update); ``random`` sends standard-normal values of the right shapes. Both are
    well-formed, so the gateway accepts them: only a robust strategy can resist them.
    """

    kind: str
    factor: float = 1.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Poison:
        kind, _, value = text.partition(":")
        if kind == "random" and not value:
            return cls("random", seed=seed)
        if kind == "scale":
            try:
                return cls("scale", float(value), seed)
            except ValueError:
                pass
        raise DeviceError(f"poison {text!r}: expected 'scale:F' (e.g. scale:-10) or 'random'")

    def apply(
        self, received: list[tuple[str, np.ndarray]], trained: list[tuple[str, np.ndarray]]
    ) -> list[tuple[str, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        if self.kind == "random":
            return [(n, rng.standard_normal(v.shape).astype(np.float32)) for n, v in trained]
        base = dict(received)
        return [(n, (base[n] + self.factor * (v - base[n])).astype(np.float32)) for n, v in trained]

    def __str__(self) -> str:
        return "random" if self.kind == "random" else f"scale:{self.factor:g}"


class DeviceError(FedCoreMLError):
    """The device cannot go on: the coordinator stayed unreachable, or refused the device."""


class _StoppedError(Exception):
    """The stop event was set."""


class _TaskDroppedError(Exception):
    """Abandon the current task (and count it as failed); ``bug`` says how loudly to log it."""

    def __init__(self, reason: str, bug: bool = False) -> None:
        super().__init__(reason)
        self.bug = bug


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` and the per-call deadline.

    The n-th retry of one call waits ``min(max_backoff, initial_backoff * 2**n)`` seconds, of
    which the upper half is random jitter; after ``give_up_after`` seconds of failing the device
    raises :class:`DeviceError`.
    """

    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    give_up_after: float = 300.0
    rpc_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("initial_backoff", "max_backoff", "give_up_after", "rpc_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class DeviceData:
    """One device's own examples in Core ML layout: a training split and a held-out split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_eval) != len(self.y_eval):
            raise ValueError("DeviceData: images and labels differ in number")
        if len(self.y_train) == 0 or len(self.y_eval) == 0:
            raise ValueError(
                f"DeviceData: needs at least one training and one held-out example, got "
                f"{len(self.y_train)} and {len(self.y_eval)}"
            )

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_eval(self) -> int:
        return len(self.y_eval)


@dataclass
class DeviceStats:
    """What one device did, for a summary: tasks, failures, retries and its last accuracy."""

    device_id: str
    registrations: int = 0
    polls: int = 0  # GetTask answers received
    waits: int = 0
    tasks_trained: int = 0  # updates the coordinator accepted
    tasks_evaluated: int = 0  # evaluations the coordinator accepted
    failures: int = 0  # tasks dropped: refused, bad model, rejected submission
    retries: int = 0  # calls retried after UNAVAILABLE / DEADLINE_EXCEEDED
    throttled: int = 0  # calls retried after RESOURCE_EXHAUSTED with a retry-after (rate limit)
    models_built: int = 0  # Keras models built (one per distinct architecture)
    last_round: int | None = None
    last_train_accuracy: float | None = None
    last_accuracy: float | None = None  # on the held-out split, from the last evaluate task
    dropouts: int = 0  # times the device vanished mid-task (it may have come back)
    finished: bool = False
    error: str | None = None

    @property
    def dropped_out(self) -> bool:
        return self.dropouts > 0

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        if self.dropped_out:
            return "dropped out"
        return "finished" if self.finished else "stopped"

    def summary(self) -> str:
        """One line: tasks, failures, last accuracy and how the device ended."""
        accuracy = "-" if self.last_accuracy is None else f"{self.last_accuracy:.4f}"
        throttled = f", throttled {self.throttled}" if self.throttled else ""
        return (
            f"{self.device_id}: trained {self.tasks_trained}, evaluated {self.tasks_evaluated}, "
            f"failures {self.failures}, retries {self.retries}{throttled}, "
            f"last accuracy {accuracy}; {self.outcome}"
        )


def task_seed(device_seed: int, task_id: str) -> int:
    """The shuffle seed a device trains a task with: fixed by its seed and the task id."""
    return zlib.crc32(f"{device_seed}:{task_id}".encode())


def architecture_key(spec: Model_pb2.Model) -> str:
    """A digest of everything in ``spec`` but its updatable parameters and metadata.

    Two specs with the same key build the same emulator (frozen weights, loss, optimizer and
    allowed values included); only the updatable parameters need loading.
    """
    bare = strip_parameters(spec)
    bare.description.metadata.Clear()
    return hashlib.sha256(spec_to_bytes(bare)).hexdigest()


def _app_version() -> str:
    try:
        return f"fedcoreml {metadata.version('fedcoreml')}"
    except metadata.PackageNotFoundError:
        return "fedcoreml"


def _describe(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    """The wait a ``RESOURCE_EXHAUSTED`` asks for (``retry-after-ms``), or None if it asks none."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = getattr(exc, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


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

    def wait(self, device_id: str, what: str, exc: grpc.RpcError) -> None:
        """Sleep before the next try, or raise DeviceError once the failure has lasted too long."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        failing_for = now - self._first_failure
        left = self._policy.give_up_after - failing_for
        if left <= 0:
            raise DeviceError(
                f"gave up after {failing_for:.1f} s: the coordinator did not answer {what} "
                f"({_describe(exc)}); is it running and reachable?"
            )
        ceiling = min(self._policy.max_backoff, self._policy.initial_backoff * 2**self._attempt)
        delay = min(left, ceiling / 2 + self._rng.uniform(0, ceiling / 2))
        self._attempt += 1
        log.warning(
            "%s: %s failed (%s); retry %d in %.2f s", device_id, what, _describe(exc),
            self._attempt, delay,
        )  # fmt: skip
        self._sleep(delay)


class SimulatedDevice:
    """One simulated iPhone taking part in a run; :meth:`run` returns when the run is finished.

    ``training_slots`` is shared by the devices of one process and bounds how many train or
    evaluate at once (default: a process-wide semaphore of 1, since TensorFlow already uses
    every core for one training). Setting ``stop`` ends :meth:`run` promptly (within a training
    at most). The device's random choices (jitter, dropping out, shuffling) follow ``seed``.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        device_id: str,
        data: DeviceData,
        *,
        seed: int = 0,
        training_slots: threading.Semaphore | None = None,
        stop: threading.Event | None = None,
        retry: RetryPolicy | None = None,
        drop_probability: float = 0.0,
        slowdown_seconds: float = 0.0,
        drops_in_round: Callable[[int], bool] | None = None,
        rejoin_after_seconds: float | None = None,
        poison: Poison | None = None,
        os_version: str = "simulated",
        app_version: str | None = None,
        capabilities: device_pb2.DeviceCapabilities | None = None,
        token: str | None = None,
    ) -> None:
        if not 0.0 <= drop_probability <= 1.0:
            raise ValueError(f"drop_probability must lie in [0, 1], got {drop_probability}")
        if slowdown_seconds < 0:
            raise ValueError(f"slowdown_seconds must be >= 0, got {slowdown_seconds}")
        self.device_id = device_id
        self.data = data
        self.stats = DeviceStats(device_id)
        self._stub = device_pb2_grpc.DeviceServiceStub(channel)
        self._metadata = bearer_metadata(token) if token else None
        self._seed = seed
        # Separate streams, so that network timing (jitter draws) never changes who drops out.
        self._jitter_rng = random.Random(f"{seed}:jitter")
        self._drop_rng = random.Random(f"{seed}:drop")
        self._slots = training_slots if training_slots is not None else _DEFAULT_TRAINING_SLOTS
        self._stop = stop if stop is not None else threading.Event()
        self._retry = retry if retry is not None else RetryPolicy()
        self._drop_probability = drop_probability
        self._drops_in_round = drops_in_round
        self._poison = poison
        self._rejoin_after = rejoin_after_seconds
        self._slowdown = slowdown_seconds
        if capabilities is None:
            capabilities = device_pb2.DeviceCapabilities(
                charging=True, unmetered_network=True, battery_level=1.0
            )
        self._capabilities = capabilities
        self._register_request = device_pb2.RegisterRequest(
            device_id=device_id,
            platform=PLATFORM,
            os_version=os_version,
            app_version=app_version if app_version is not None else _app_version(),
            capabilities=self._capabilities,
        )
        self._session_id = ""
        self._pacing = device_pb2.PacingHints()
        self._emulator: CoreMLEmulator | None = None
        self._emulator_key: str | None = None

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> DeviceStats:
        """Register and work until the coordinator says the run is finished (or ``stop``).

        Returns the stats; raises DeviceError (also recorded in ``stats.error``) when the
        coordinator stays unreachable for ``give_up_after`` seconds or refuses the device.
        """
        log.info(
            "%s: starting with %d training and %d held-out examples",
            self.device_id, self.data.num_train, self.data.num_eval,
        )  # fmt: skip
        try:
            self._register()
            self._work()
        except _StoppedError:
            log.info("%s: stopped", self.device_id)
        except DeviceError as exc:
            self.stats.error = str(exc)
            log.error("%s: %s", self.device_id, exc)
            raise
        return self.stats

    def _work(self) -> None:
        while True:
            response = self._get_task()
            kind = response.WhichOneof("task")
            if kind == "finished":
                self.stats.finished = True
                log.info(
                    "%s: run finished (%s); final model v%d",
                    self.device_id, response.finished.reason or "no reason given",
                    response.finished.final_model.version,
                )  # fmt: skip
                return
            if kind == "wait":
                self._wait(response.wait)
            elif kind in ("train", "evaluate"):
                if not self._run_task(kind, getattr(response, kind)):
                    if self._rejoin_after is None:
                        return  # dropped out for good
                    # The app is relaunched: a new session, the old task forgotten.
                    self._sleep(self._rejoin_after)
                    self._register()
            else:
                log.warning("%s: GetTask answered with no task; polling again", self.device_id)
                self._sleep(self._poll_seconds())

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _StoppedError

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(max(0.0, seconds)):
            raise _StoppedError

    def _poll_seconds(self, retry_after_ms: int = 0) -> float:
        millis = retry_after_ms or self._pacing.poll_interval_ms
        return millis / 1000 if millis else DEFAULT_POLL_SECONDS

    def _wait(self, wait: device_pb2.Wait) -> None:
        self.stats.waits += 1
        seconds = self._poll_seconds(wait.retry_after_ms)
        log.debug("%s: no task yet (%s); asking again in %.2f s", self.device_id, wait.reason,
                  seconds)  # fmt: skip
        self._sleep(seconds)

    # -- calls --------------------------------------------------------------------------------

    def _unary(self, what: str, method: Callable[..., T], request: object) -> T:
        """A unary call with the device's deadline and token, retried as :meth:`_call` does."""
        call = functools.partial(
            method, request, timeout=self._retry.rpc_timeout, metadata=self._metadata
        )
        return self._call(what, call)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried with backoff while it fails with a transient status code."""
        backoff = _Backoff(self._retry, self._jitter_rng, self._sleep)
        while True:
            self._check_stop()
            try:
                return call()
            except grpc.RpcError as exc:
                if not self._should_retry(what, exc, backoff):
                    raise

    def _should_retry(self, what: str, exc: grpc.RpcError, backoff: _Backoff) -> bool:
        """After a failed call: sleep and say True to retry it, or False to handle ``exc``.

        Raises DeviceError for ``UNAUTHENTICATED`` (no token, or one the coordinator refuses):
        retrying cannot help, and neither can any other call.
        """
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise DeviceError(
                f"the coordinator refused this device's credentials on {what} "
                f"({_describe(exc)}); check its token (--token-file)"
            ) from None
        throttle = _retry_after_s(exc)
        if throttle is not None:
            self.stats.throttled += 1
            delay = min(throttle, self._retry.max_backoff)
            log.info("%s: %s throttled by the coordinator; retrying in %.3f s", self.device_id,
                     what, delay)  # fmt: skip
            self._sleep(delay)
            return True
        if exc.code() not in TRANSIENT_CODES:
            return False
        self.stats.retries += 1
        backoff.wait(self.device_id, what, exc)
        return True

    def _register(self) -> None:
        try:
            response = self._unary("Register", self._stub.Register, self._register_request)
        except grpc.RpcError as exc:
            raise DeviceError(
                f"the coordinator refused the registration ({_describe(exc)})"
            ) from None
        self._session_id = response.session_id
        self._pacing = response.pacing
        self.stats.registrations += 1
        log.info(
            "%s: registered, session %s (poll %d ms, session ttl %d ms)",
            self.device_id, self._session_id, self._pacing.poll_interval_ms,
            self._pacing.session_ttl_ms,
        )  # fmt: skip

    def _get_task(self) -> device_pb2.GetTaskResponse:
        """The next GetTask answer; registers again whenever the session is unknown."""
        losses = 0
        while True:
            request = device_pb2.GetTaskRequest(
                session_id=self._session_id, capabilities=self._capabilities
            )
            try:
                response = self._unary("GetTask", self._stub.GetTask, request)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise DeviceError(f"GetTask refused ({_describe(exc)})") from None
                losses += 1
                if losses > MAX_SESSION_LOSSES:
                    raise DeviceError(
                        f"the coordinator forgot the session {losses} times in a row right "
                        f"after registering ({_describe(exc)})"
                    ) from None
                log.warning(
                    "%s: session %s is unknown to the coordinator (%s); registering again",
                    self.device_id, self._session_id, exc.details(),
                )  # fmt: skip
                if losses > 1:
                    self._sleep(self._poll_seconds())
                self._register()
                continue
            self.stats.polls += 1
            return response

    def _task_error(self, what: str, exc: grpc.RpcError) -> _TaskDroppedError:
        code = exc.code()
        if code in TASK_GONE_CODES:
            return _TaskDroppedError(f"{what} refused: {_describe(exc)}")
        if code in BUG_CODES:
            return _TaskDroppedError(
                f"{what} refused as malformed, a bug in this device or the coordinator: "
                f"{_describe(exc)}",
                bug=True,
            )
        return _TaskDroppedError(f"{what} failed unexpectedly: {_describe(exc)}", bug=True)

    # -- one task -----------------------------------------------------------------------------

    def _run_task(self, kind: str, task: device_pb2.TrainTask | device_pb2.EvaluateTask) -> bool:
        """Do one train or evaluate task; False when the device dropped out."""
        started = time.monotonic()
        log.info(
            "%s: %s task %s, round %d, model v%d (%d bytes)",
            self.device_id, kind, task.task_id, task.round, task.model.version,
            task.model.size_bytes,
        )  # fmt: skip
        try:
            model_bytes = self._download(task.task_id, task.model)
            scheduled = (
                kind == "train"
                and self._drops_in_round is not None
                and self._drops_in_round(task.round)
            )
            drawn = self._drop_probability and self._drop_rng.random() < self._drop_probability
            if scheduled or drawn:
                self.stats.dropouts += 1
                log.warning(
                    "%s: dropping out during task %s (simulated: the phone vanished after the "
                    "download; nothing will be submitted)", self.device_id, task.task_id,
                )  # fmt: skip
                return False
            spec = self._parse(model_bytes, task)
            if kind == "train":
                self._train(task, spec, started)
            else:
                self._evaluate(task, spec, started)
        except _TaskDroppedError as drop:
            self.stats.failures += 1
            level = logging.ERROR if drop.bug else logging.WARNING
            log.log(level, "%s: dropped task %s: %s", self.device_id, task.task_id, drop)
        return True

    def _download(self, task_id: str, ref: device_pb2.ModelRef) -> bytes:
        """The task's whole .mlmodel, resuming after broken streams, checked against ``ref``."""
        data = bytearray()
        backoff = _Backoff(self._retry, self._jitter_rng, self._sleep)
        while True:
            self._check_stop()
            request = device_pb2.DownloadModelRequest(
                session_id=self._session_id, task_id=task_id, offset=len(data)
            )
            stream = self._stub.DownloadModel(
                request, timeout=self._retry.rpc_timeout, metadata=self._metadata
            )
            try:
                for chunk in stream:
                    self._append_chunk(data, chunk, ref)
                    backoff.reset()
                    self._check_stop()
                break
            except grpc.RpcError as exc:
                what = f"DownloadModel of task {task_id} (resuming at byte {len(data)})"
                if not self._should_retry(what, exc, backoff):
                    raise self._task_error("DownloadModel", exc) from None
            finally:
                stream.cancel()  # a no-op once the stream has ended
        _verify_model(data, ref)
        log.info("%s: downloaded %d bytes, sha256 verified", self.device_id, len(data))
        return bytes(data)

    @staticmethod
    def _append_chunk(
        data: bytearray, chunk: device_pb2.ModelChunk, ref: device_pb2.ModelRef
    ) -> None:
        if chunk.offset != len(data):
            raise _TaskDroppedError(
                f"model chunk at byte {chunk.offset}, expected byte {len(data)}", bug=True
            )
        if chunk.total_size != ref.size_bytes:
            raise _TaskDroppedError(
                f"the download is {chunk.total_size} bytes but the task announced "
                f"{ref.size_bytes}; not using it"
            )
        if len(data) + len(chunk.data) > ref.size_bytes:
            raise _TaskDroppedError(f"the download runs past the announced {ref.size_bytes} bytes")
        data.extend(chunk.data)

    def _parse(self, model_bytes: bytes, task: device_pb2.TrainTask | device_pb2.EvaluateTask):
        try:
            return spec_from_bytes(model_bytes, source=f"model of task {task.task_id}")
        except FedCoreMLError as exc:
            raise _TaskDroppedError(str(exc), bug=True) from None

    @contextlib.contextmanager
    def _training_slot(self) -> Iterator[None]:
        while not self._slots.acquire(timeout=_STOP_POLL_SECONDS):
            self._check_stop()
        try:
            self._check_stop()
            yield
        finally:
            self._slots.release()

    def _emulator_for(self, spec: Model_pb2.Model, name: str) -> CoreMLEmulator:
        """The emulator for ``spec``: the current one with new parameters, if the model is alike."""
        try:
            key = architecture_key(spec)
            if self._emulator is not None and key == self._emulator_key:
                self._emulator.set_parameters(get_parameters(spec, name))
                return self._emulator
            with _BUILD_LOCK:
                emulator = CoreMLEmulator(spec, name)
        except FedCoreMLError as exc:
            raise _TaskDroppedError(f"cannot run the model: {exc}", bug=True) from None
        self._emulator, self._emulator_key = emulator, key
        self.stats.models_built += 1
        log.info("%s: built the training graph for %s", self.device_id, name)
        return emulator

    def _train(self, task: device_pb2.TrainTask, spec: Model_pb2.Model, started: float) -> None:
        config = task.config
        name = f"model v{task.model.version}"
        with self._training_slot():
            emulator = self._emulator_for(spec, name)
            try:
                result = emulator.train(
                    self.data.x_train,
                    self.data.y_train,
                    epochs=config.epochs or None,  # 0: unset, the model's default
                    batch_size=config.batch_size or None,
                    learning_rate=config.learning_rate or None,
                    seed=task_seed(self._seed, task.task_id),
                )
            except FedCoreMLError as exc:
                raise _TaskDroppedError(f"cannot train: {exc}", bug=True) from None
        log.info(
            "%s: trained on %d examples in %.2f s (%d epoch(s), batch %d, lr %g): loss %.4f, "
            "accuracy %.4f", self.device_id, result.num_examples, result.seconds,
            result.config.epochs, result.config.batch_size, result.config.learning_rate,
            result.loss, result.accuracy,
        )  # fmt: skip
        if not _all_finite(result.loss, result.parameters):
            raise _TaskDroppedError(f"training diverged (loss {result.loss}); not submitting")
        if self._poison is not None:
            result.parameters = self._poison.apply(get_parameters(spec, name), result.parameters)
            log.info("%s: submitting a poisoned update (%s)", self.device_id, self._poison)
        self._straggle(task.deadline_ms, started)
        header = UpdateHeader(
            session_id=self._session_id,
            task_id=task.task_id,
            num_examples=result.num_examples,
            loss=result.loss,
            accuracy=result.accuracy,
            train_seconds=result.seconds,
        )

        def submit() -> device_pb2.SubmitUpdateResponse:
            stream = encode_update(header, result.parameters, self._chunk_bytes())
            return self._stub.SubmitUpdate(
                stream, timeout=self._retry.rpc_timeout, metadata=self._metadata
            )

        try:
            response = self._call("SubmitUpdate", submit)
        except grpc.RpcError as exc:
            raise self._task_error("SubmitUpdate", exc) from None
        if not response.accepted:
            raise _TaskDroppedError("the coordinator did not accept the update")
        self.stats.tasks_trained += 1
        self.stats.last_round = response.round
        self.stats.last_train_accuracy = result.accuracy
        log.info("%s: update for task %s accepted (round %d)", self.device_id, task.task_id,
                 response.round)  # fmt: skip

    def _evaluate(
        self, task: device_pb2.EvaluateTask, spec: Model_pb2.Model, started: float
    ) -> None:
        with self._training_slot():
            emulator = self._emulator_for(spec, f"model v{task.model.version}")
            try:
                loss, accuracy = emulator.evaluate(self.data.x_eval, self.data.y_eval)
            except FedCoreMLError as exc:
                raise _TaskDroppedError(f"cannot evaluate: {exc}", bug=True) from None
        log.info(
            "%s: evaluated model v%d on %d held-out examples: loss %.4f, accuracy %.4f",
            self.device_id, task.model.version, self.data.num_eval, loss, accuracy,
        )  # fmt: skip
        self._straggle(task.deadline_ms, started)
        request = device_pb2.SubmitEvaluationRequest(
            session_id=self._session_id,
            task_id=task.task_id,
            num_examples=self.data.num_eval,
            loss=loss,
            accuracy=accuracy,
        )
        try:
            response = self._unary("SubmitEvaluation", self._stub.SubmitEvaluation, request)
        except grpc.RpcError as exc:
            raise self._task_error("SubmitEvaluation", exc) from None
        if not response.accepted:
            raise _TaskDroppedError("the coordinator did not accept the evaluation")
        self.stats.tasks_evaluated += 1
        self.stats.last_round = task.round
        self.stats.last_accuracy = accuracy

    def _straggle(self, deadline_ms: int, started: float) -> None:
        """Sleep ``slowdown_seconds`` (a straggler), and warn when the deadline has passed."""
        if self._slowdown:
            log.info("%s: straggling for %.2f s before submitting", self.device_id,
                     self._slowdown)  # fmt: skip
            self._sleep(self._slowdown)
        elapsed = time.monotonic() - started
        if deadline_ms and elapsed > deadline_ms / 1000:
            log.warning(
                "%s: submitting %.1f s after the task's %.1f s deadline; it may be refused",
                self.device_id, elapsed, deadline_ms / 1000,
            )  # fmt: skip

    def _chunk_bytes(self) -> int:
        """Tensor slice size: the coordinator's preference, never over its message limit."""
        limit = (self._pacing.max_message_bytes or MAX_MESSAGE_BYTES) - _FRAMING_BYTES
        preferred = self._pacing.chunk_bytes or DEFAULT_CHUNK_BYTES
        return max(4, min(preferred, limit) // 4 * 4)


def _verify_model(data: bytearray, ref: device_pb2.ModelRef) -> None:
    if len(data) != ref.size_bytes:
        raise _TaskDroppedError(
            f"downloaded {len(data)} bytes but the task announced {ref.size_bytes}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256.lower():
        raise _TaskDroppedError(
            f"sha256 mismatch: the model hashes to {digest} but the task announced "
            f"{ref.sha256 or '(none)'}; not using it"
        )


def _all_finite(loss: float, parameters: list[tuple[str, np.ndarray]]) -> bool:
    return bool(np.isfinite(loss)) and all(np.isfinite(value).all() for _, value in parameters)
