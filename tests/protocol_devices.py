"""Scripted protocol-level devices for coordinator tests: DeviceClient with a trainer that does
not train.

Each device is the reference :class:`~fedcoreml.ios_bridge.device_client.DeviceClient` (so it
speaks the wire protocol exactly as the iOS app does, downloads and verifies the model) whose
trainer submits parameters derived from the model it received (received + its own offset) with
a chosen example count, so a test knows precisely what every device sent.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.device_client import (
    DeviceClient,
    EvaluationResult,
    FailedPreconditionError,
    RetryPolicy,
    TrainResult,
)
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.wire import device_pb2

# Scripted devices meet coordinators that are up already; a retry streak means a broken test.
RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=1.0, give_up_after=30.0, rpc_timeout=60.0)
CHUNK_BYTES = 512 * 1024


@dataclass
class Submission:
    round: int
    num_examples: int
    parameters: list[tuple[str, np.ndarray]]


class _DiedError(Exception):
    """The scripted phone vanished mid-task."""


# (client, task, parameters to send) -> None; hooks for tests that attack their own session
Hook = Callable[[DeviceClient, object, list[tuple[str, np.ndarray]]], None]


@dataclass
class ScriptedDevice:
    address: str
    device_id: str
    num_examples: int
    offset: float  # added to every received parameter
    die_in_round: int | None = None  # vanish after downloading this round's model
    delay_s: float = 0.0  # straggle this long before submitting
    rejoin_after_s: float | None = None  # after dying, come back as a relaunched app
    token: str | None = None  # sent as bearer metadata on every call
    noise: float = 0.0  # plus this much seeded noise, the same for a device and round every run
    before_submit: Hook | None = None
    after_submit: Hook | None = None
    before_evaluation: Hook | None = None
    submissions: list[Submission] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # FAILED_PRECONDITION: a straggler
    evaluations: int = 0
    finished: bool = False
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            with open_channel(self.address) as channel:
                client = _ScriptedClient(self, channel, stop)
                while not stop.is_set():
                    try:
                        client.run()
                    except _DiedError:
                        if self.rejoin_after_s is None or stop.wait(self.rejoin_after_s):
                            return
                        self.die_in_round = None
                        continue
                    self.finished = client.stats.finished
                    return
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    # -- the trainer --------------------------------------------------------------------------

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        if self.die_in_round == task.round:
            raise _DiedError
        received = get_parameters(spec_from_bytes(model))
        sent = [(n, (v + np.float32(self.offset)).astype(np.float32)) for n, v in received]
        if self.noise:
            rng = np.random.default_rng([zlib.crc32(self.device_id.encode()), task.round])
            sent = [(n, (v + self.noise * rng.standard_normal(v.shape)).astype(np.float32))
                    for n, v in sent]  # fmt: skip
        return TrainResult(sent, self.num_examples, 0.5, 0.5, 0.1)

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        return EvaluationResult(self.num_examples, 0.3, 0.8)


class _ScriptedClient(DeviceClient):
    """DeviceClient with the scripted device's hooks around its submissions."""

    def __init__(self, device: ScriptedDevice, channel, stop: threading.Event) -> None:
        super().__init__(channel, device.device_id, device, platform="scripted",
                         token=device.token, retry=RETRY, stop=stop)  # fmt: skip
        self.device = device
        self._task: device_pb2.TrainTask | None = None

    def _train(self, task, model, received) -> None:
        self._task = task
        super()._train(task, model, received)

    def submit_update(self, task_id, result, chunk_bytes=None):
        device, task = self.device, self._task
        self.sleep(device.delay_s)
        if device.before_submit is not None:
            device.before_submit(self, task, result.parameters)
        try:
            response = super().submit_update(task_id, result, chunk_bytes or CHUNK_BYTES)
        except FailedPreconditionError as exc:
            device.refused.append(exc.message)
            raise
        device.submissions.append(Submission(task.round, result.num_examples, result.parameters))
        if device.after_submit is not None:
            device.after_submit(self, task, result.parameters)
        return response

    def _evaluate(self, task, model) -> None:
        # the hooks attack around the honest evaluation; their own calls are not hooked
        if self.device.before_evaluation is not None:
            self.device.before_evaluation(self, task, [])
        super()._evaluate(task, model)
        self.device.evaluations += 1


def start_devices(devices: list[ScriptedDevice]) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [threading.Thread(target=d.run, args=(stop,), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    return stop, threads


def run_to_the_end(coordinator, stop: threading.Event, threads: list[threading.Thread]):
    """Run the coordinator's whole run; then stop the devices (and helper threads) and it."""
    try:
        return coordinator.run()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        coordinator.stop()
