"""A simulated iPhone: the reference DeviceClient, the Core ML emulator as its trainer, and faults.

:class:`SimulatedDevice` behaves like the iOS app described in ``protos/README.md`` because it
*is* the protocol's reference client, :class:`~fedcoreml.ios_bridge.device_client.DeviceClient`,
given an :class:`EmulatorTrainer` that trains and evaluates each downloaded ``.mlmodel`` on the
device's own data with :class:`~fedcoreml.client_sim.emulator.CoreMLEmulator`.

For tests and demonstrations, :class:`FaultyTrainer` wraps that trainer with the failures real
phones have: dropping out (after downloading a task's model the device vanishes without
submitting, as a phone that loses power would, and may come back later as a relaunched app),
straggling (``slowdown_seconds`` before each submission) and poisoned updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

import grpc
import numpy as np

from fedcoreml.client_sim.availability import AvailabilityProfile
from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.device_client import (
    ClientStats,
    DeviceClient,
    EvaluationResult,
    RetryPolicy,
    TaskAbandonedError,
    Trainer,
    TrainResult,
)
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, strip_parameters
from fedcoreml.ios_bridge.wire import device_pb2

__all__ = [
    "PLATFORM",
    "DeviceData",
    "DeviceStats",
    "EmulatorTrainer",
    "FaultyTrainer",
    "Poison",
    "RetryPolicy",
    "SimulatedDevice",
    "architecture_key",
    "task_seed",
]

log = logging.getLogger("fedcoreml.device")

PLATFORM = "simulated"
_STOP_POLL_SECONDS = 0.1

# Building Keras graphs from several threads at once is not something Keras promises to support.
_BUILD_LOCK = threading.Lock()
# Devices that are not given a semaphore share this one: one training at a time per process.
_DEFAULT_TRAINING_SLOTS = threading.Semaphore(1)


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
        raise FedCoreMLError(f"poison {text!r}: expected 'scale:F' (e.g. scale:-10) or 'random'")

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
class DeviceStats(ClientStats):
    """A simulated device's stats: the client's, and what the simulation did to it."""

    models_built: int = 0  # Keras models built (one per distinct architecture)
    dropouts: int = 0  # times the device vanished mid-task (it may have come back)

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


class EmulatorTrainer:
    """Trains and evaluates downloaded models on one device's data with the Core ML emulator.

    The emulator is built once per architecture and reused with each task's parameters.
    ``training_slots`` bounds how many devices of a process train at once (default: one, since
    TensorFlow already uses every core for one training); ``stop`` ends a wait for a slot.
    """

    def __init__(
        self,
        data: DeviceData,
        stats: DeviceStats,
        *,
        seed: int = 0,
        training_slots: threading.Semaphore | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.data = data
        self.stats = stats
        self._seed = seed
        self._slots = training_slots if training_slots is not None else _DEFAULT_TRAINING_SLOTS
        self._stop = stop if stop is not None else threading.Event()
        self._emulator: CoreMLEmulator | None = None
        self._emulator_key: str | None = None

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        config = task.config
        with self._training_slot():
            emulator = self._emulator_for(model, task)
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
                raise TaskAbandonedError(f"cannot train: {exc}") from None
        log.info(
            "%s: trained on %d examples in %.2f s (%d epoch(s), batch %d, lr %g): loss %.4f, "
            "accuracy %.4f", self.stats.device_id, result.num_examples, result.seconds,
            result.config.epochs, result.config.batch_size, result.config.learning_rate,
            result.loss, result.accuracy,
        )  # fmt: skip
        return TrainResult(
            result.parameters, result.num_examples, result.loss, result.accuracy, result.seconds
        )

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        with self._training_slot():
            emulator = self._emulator_for(model, task)
            try:
                loss, accuracy = emulator.evaluate(self.data.x_eval, self.data.y_eval)
            except FedCoreMLError as exc:
                raise TaskAbandonedError(f"cannot evaluate: {exc}") from None
        log.info(
            "%s: evaluated model v%d on %d held-out examples: loss %.4f, accuracy %.4f",
            self.stats.device_id, task.model.version, self.data.num_eval, loss, accuracy,
        )  # fmt: skip
        return EvaluationResult(self.data.num_eval, loss, accuracy)

    @contextlib.contextmanager
    def _training_slot(self) -> Iterator[None]:
        while not self._slots.acquire(timeout=_STOP_POLL_SECONDS):
            if self._stop.is_set():
                raise TaskAbandonedError("stopped while waiting to train")
        try:
            yield
        finally:
            self._slots.release()

    def _emulator_for(
        self, model: bytes, task: device_pb2.TrainTask | device_pb2.EvaluateTask
    ) -> CoreMLEmulator:
        """The emulator for ``model``: the current one with new parameters if the model is alike."""
        name = f"model v{task.model.version}"
        try:
            spec = spec_from_bytes(model, source=f"model of task {task.task_id}")
            key = architecture_key(spec)
            if self._emulator is not None and key == self._emulator_key:
                self._emulator.set_parameters(get_parameters(spec, name))
                return self._emulator
            with _BUILD_LOCK:
                emulator = CoreMLEmulator(spec, name)
        except FedCoreMLError as exc:
            raise TaskAbandonedError(f"cannot run the model: {exc}") from None
        self._emulator, self._emulator_key = emulator, key
        self.stats.models_built += 1
        log.info("%s: built the training graph for %s", self.stats.device_id, name)
        return emulator


class VanishedError(Exception):
    """The simulated phone vanished mid-task (it submits nothing and stops talking)."""


class FaultyTrainer:
    """A trainer with a phone's failures: vanishing after the download, straggling, poisoning.

    ``drop_probability`` is the chance per task of vanishing; ``drops_in_round(round)`` says
    whether the device vanishes in a given round's train task; ``slowdown_seconds`` is slept
    (waking when ``sleep`` is interrupted) before each result is handed back, and a
    ``slowdown_factor`` F > 1 makes training take F times as long (it sleeps F - 1 times the
    training's own wall time after it), as an older phone would.
    """

    def __init__(
        self,
        inner: Trainer,
        *,
        seed: int = 0,
        drop_probability: float = 0.0,
        drops_in_round: Callable[[int], bool] | None = None,
        slowdown_seconds: float = 0.0,
        slowdown_factor: float = 1.0,
        poison: Poison | None = None,
        sleep: Callable[[float], None],
    ) -> None:
        if not 0.0 <= drop_probability <= 1.0:
            raise ValueError(f"drop_probability must lie in [0, 1], got {drop_probability}")
        if slowdown_seconds < 0:
            raise ValueError(f"slowdown_seconds must be >= 0, got {slowdown_seconds}")
        if not slowdown_factor >= 1:
            raise ValueError(f"slowdown_factor must be >= 1, got {slowdown_factor}")
        self._slowdown_factor = slowdown_factor
        self.inner = inner
        self._drop_rng = random.Random(f"{seed}:drop")
        self._drop_probability = drop_probability
        self._drops_in_round = drops_in_round
        self._slowdown = slowdown_seconds
        self._poison = poison
        self._sleep = sleep

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        scheduled = self._drops_in_round is not None and self._drops_in_round(task.round)
        self._maybe_vanish(task.task_id, scheduled)
        result = self.inner.train(model, task)
        if self._slowdown_factor > 1:
            self._sleep((self._slowdown_factor - 1) * result.seconds)
        if self._poison is not None:
            received = get_parameters(spec_from_bytes(model))
            poisoned = self._poison.apply(received, result.parameters)
            result = TrainResult(
                poisoned, result.num_examples, result.loss, result.accuracy, result.seconds
            )
        self._straggle()
        return result

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        self._maybe_vanish(task.task_id, scheduled=False)
        result = self.inner.evaluate(model, task)
        self._straggle()
        return result

    def _maybe_vanish(self, task_id: str, scheduled: bool) -> None:
        drawn = self._drop_probability and self._drop_rng.random() < self._drop_probability
        if scheduled or drawn:
            raise VanishedError(f"the phone vanished during task {task_id}")

    def _straggle(self) -> None:
        if self._slowdown:
            self._sleep(self._slowdown)


class SimulatedDevice:
    """One simulated iPhone taking part in a run; :meth:`run` returns when the run is finished.

    It is a :class:`DeviceClient` (``platform="simulated"``) with an :class:`EmulatorTrainer`
    wrapped in a :class:`FaultyTrainer`. A device that vanishes ends :meth:`run` with
    ``stats.dropouts`` counted, or, with ``rejoin_after_seconds``, comes back that much later as
    a relaunched app (a new registration, the old task forgotten). Setting ``stop`` ends
    :meth:`run` promptly (within a training at most). With ``availability`` the device reports
    that profile's charging, network and battery (time counted from construction) instead of
    the fixed ``capabilities``.
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
        slowdown_factor: float = 1.0,
        drops_in_round: Callable[[int], bool] | None = None,
        rejoin_after_seconds: float | None = None,
        poison: Poison | None = None,
        os_version: str = "simulated",
        app_version: str | None = None,
        capabilities: device_pb2.DeviceCapabilities | None = None,
        availability: AvailabilityProfile | None = None,
        token: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.data = data
        self.stats = DeviceStats(device_id)
        stop = stop if stop is not None else threading.Event()
        emulator = EmulatorTrainer(data, self.stats, seed=seed, training_slots=training_slots,
                                   stop=stop)  # fmt: skip
        self.client = DeviceClient(
            channel,
            device_id,
            platform=PLATFORM,
            os_version=os_version,
            app_version=app_version if app_version is not None else _app_version(),
            capabilities=capabilities,
            capabilities_provider=availability.provider() if availability is not None else None,
            token=token,
            retry=retry,
            stop=stop,
            seed=seed,
            stats=self.stats,
        )
        self.client.trainer = FaultyTrainer(
            emulator,
            seed=seed,
            drop_probability=drop_probability,
            drops_in_round=drops_in_round,
            slowdown_seconds=slowdown_seconds,
            slowdown_factor=slowdown_factor,
            poison=poison,
            sleep=self.client.sleep,
        )
        self._rejoin_after = rejoin_after_seconds

    def run(self) -> DeviceStats:
        """Work until the run is finished, the device drops out for good, or ``stop``.

        Raises what :meth:`DeviceClient.run` raises (GaveUpError, UnauthenticatedError, ...).
        """
        log.info(
            "%s: starting with %d training and %d held-out examples",
            self.device_id, self.data.num_train, self.data.num_eval,
        )  # fmt: skip
        while True:
            try:
                return self.client.run()
            except VanishedError as exc:
                self.stats.dropouts += 1
                log.warning("%s: dropping out: %s (simulated: nothing will be submitted)",
                            self.device_id, exc)  # fmt: skip
                if self._rejoin_after is None:
                    return self.stats
                if self.client.stop.wait(self._rejoin_after):
                    return self.stats
