"""Scripted protocol-level devices for coordinator tests: real gRPC, no training.

Each device speaks the wire protocol exactly as the iOS app does, downloads and verifies the
model, and submits parameters it derives from the model it received (received + its own offset)
with a chosen example count, so a test knows precisely what every device sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from fedcoreml.ios_bridge.channel import bearer_metadata
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc


@dataclass
class Submission:
    round: int
    num_examples: int
    parameters: list[tuple[str, np.ndarray]]


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
    # called with (stub, session, task, parameters to send) before and after the submission
    before_submit: Callable | None = None
    after_submit: Callable | None = None
    before_evaluation: Callable | None = None
    submissions: list[Submission] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    evaluations: int = 0
    finished: bool = False
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            self._run(stop)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._session(stop) != "died" or self.rejoin_after_s is None:
                return
            time.sleep(self.rejoin_after_s)
            self.die_in_round = None

    def _session(self, stop: threading.Event) -> str:
        with grpc.insecure_channel(self.address) as plain:
            channel = plain
            if self.token is not None:
                channel = grpc.intercept_channel(plain, WithMetadata(bearer_metadata(self.token)))
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            session = stub.Register(
                device_pb2.RegisterRequest(device_id=self.device_id, platform="scripted")
            ).session_id
            while not stop.is_set():
                reply = stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
                kind = reply.WhichOneof("task")
                if kind == "wait":
                    time.sleep(reply.wait.retry_after_ms / 1000)
                elif kind == "finished":
                    self.finished = True
                    return "finished"
                elif kind == "train":
                    task = reply.train
                    model = download(stub, session, task.task_id, task.model)
                    if self.die_in_round == task.round:
                        return "died"  # the phone vanished mid-task
                    received = get_parameters(spec_from_bytes(model))
                    sent = [(n, (v + np.float32(self.offset)).astype(np.float32))
                            for n, v in received]  # fmt: skip
                    if self.noise:
                        rng = np.random.default_rng(
                            [zlib.crc32(self.device_id.encode()), task.round]
                        )
                        noise = self.noise
                        sent = [(n, (v + noise * rng.standard_normal(v.shape)).astype(np.float32))
                                for n, v in sent]  # fmt: skip
                    header = UpdateHeader(session, task.task_id, self.num_examples, 0.5, 0.5, 0.1)
                    time.sleep(self.delay_s)
                    if self.before_submit is not None:
                        self.before_submit(stub, session, task, sent)
                    try:
                        stub.SubmitUpdate(encode_update(header, sent, chunk_bytes=512 * 1024))
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            raise
                        self.refused.append(exc.details())  # a straggler: the round closed
                        continue
                    self.submissions.append(Submission(task.round, self.num_examples, sent))
                    if self.after_submit is not None:
                        self.after_submit(stub, session, task, sent)
                elif kind == "evaluate":
                    task = reply.evaluate
                    download(stub, session, task.task_id, task.model)
                    if self.before_evaluation is not None:
                        self.before_evaluation(stub, session, task, [])
                    stub.SubmitEvaluation(
                        device_pb2.SubmitEvaluationRequest(
                            session_id=session,
                            task_id=task.task_id,
                            num_examples=self.num_examples,
                            loss=0.3,
                            accuracy=0.8,
                        )
                    )
                    self.evaluations += 1
        return "stopped"


class WithMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Adds fixed metadata (a bearer token) to every call, as the iOS app's client does."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def download(stub, session: str, task_id: str, ref: device_pb2.ModelRef) -> bytes:
    data = b"".join(
        chunk.data
        for chunk in stub.DownloadModel(
            device_pb2.DownloadModelRequest(session_id=session, task_id=task_id)
        )
    )
    assert len(data) == ref.size_bytes and hashlib.sha256(data).hexdigest() == ref.sha256
    return data


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
