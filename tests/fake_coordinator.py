"""A fake coordinator for device-side tests, served by a real gRPC server.

The fake follows protos/README.md: it registers devices, hands out a scripted sequence of
GetTask answers per device, serves each task's model in chunks and checks submitted updates with
the strict decoder. Knobs on it inject the failures the contract describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from fedcoreml.ios_bridge.channel import CHANNEL_OPTIONS, RETRY_AFTER_KEY
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.parameters import parameter_infos
from fedcoreml.ios_bridge.tensor_codec import MalformedUpdateError, decode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

CHUNK = 256 * 1024  # the default model (2.3 MB) comes in 9 chunks

MODEL_0 = spec_to_bytes(build_default_model(seed=0))
MODEL_1 = spec_to_bytes(build_default_model(seed=1))  # same architecture, other parameters


# -- the fake coordinator ---------------------------------------------------------------------


def model_ref(model: bytes, version: int = 0, sha256: str | None = None) -> device_pb2.ModelRef:
    digest = sha256 if sha256 is not None else hashlib.sha256(model).hexdigest()
    return device_pb2.ModelRef(version=version, sha256=digest, size_bytes=len(model))


def train(task_id: str, model: bytes, round_: int = 1, sha256: str | None = None):
    return device_pb2.GetTaskResponse(
        train=device_pb2.TrainTask(
            task_id=task_id,
            round=round_,
            model=model_ref(model, round_ - 1, sha256),
            config=device_pb2.TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3),
            deadline_ms=60_000,
        )
    )


def evaluate(task_id: str, model: bytes, round_: int = 1):
    return device_pb2.GetTaskResponse(
        evaluate=device_pb2.EvaluateTask(
            task_id=task_id, round=round_, model=model_ref(model, round_), deadline_ms=60_000
        )
    )


def wait(millis: int) -> device_pb2.GetTaskResponse:
    return device_pb2.GetTaskResponse(wait=device_pb2.Wait(retry_after_ms=millis, reason="test"))


class FakeCoordinator(device_pb2_grpc.DeviceServiceServicer):
    """Each device gets its own copy of ``script``; then ``finished``."""

    def __init__(self, script: list[device_pb2.GetTaskResponse], models: dict[str, bytes]):
        self._lock = threading.Lock()
        self._script = script
        self._models = models
        self._infos = {
            task_id: parameter_infos(spec_from_bytes(model)) for task_id, model in models.items()
        }
        self._scripts: dict[str, list[device_pb2.GetTaskResponse]] = {}
        self._sessions: dict[str, str] = {}  # session id -> device id
        self.registrations: list[device_pb2.RegisterRequest] = []
        self.get_task_calls = 0
        self.download_offsets: list[tuple[str, int]] = []
        self.updates: dict[tuple[str, str], tuple] = {}  # (device, task) -> (header, params)
        self.evaluations: dict[tuple[str, str], device_pb2.SubmitEvaluationRequest] = {}
        # failure injection
        self.get_task_faults: list[grpc.StatusCode] = []  # abort the next GetTask calls
        self.forget_sessions = 0  # answer this many GetTask calls with NOT_FOUND
        self.break_downloads = 0  # cut this many download streams after their first chunk
        self.refuse_submissions: grpc.StatusCode | None = None
        self.corrupt_downloads = 0  # flip a byte in this many downloads
        self.throttle_get_task_ms: list[int] = []  # RESOURCE_EXHAUSTED + retry-after-ms
        self.long_poll_ms = 0
        # the coordinator dies during the next call of each RPC named (UNAVAILABLE) and comes
        # back without the sessions it had, as a restarted coordinator does
        self.restart_at: list[str] = []
        self.get_task_times: list[float] = []  # monotonic time of every GetTask call
        self.get_task_capabilities: list[device_pb2.DeviceCapabilities] = []  # of every GetTask
        self.update_chunks: list[int] = []  # data bytes of every tensor chunk received

    def _maybe_restart(self, rpc: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            restart = rpc in self.restart_at
            if restart:
                self.restart_at.remove(rpc)
                self._sessions.clear()
        if restart:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the coordinator restarts")

    def _device(self, session_id: str, context: grpc.ServicerContext) -> str:
        with self._lock:
            device = self._sessions.get(session_id)
        if device is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session '{session_id}'")
        return device

    def Register(self, request, context):  # noqa: N802 (gRPC names)
        with self._lock:
            self.registrations.append(request)
            session = f"session-{len(self.registrations)}"
            self._sessions[session] = request.device_id
            self._scripts.setdefault(request.device_id, list(self._script))
        pacing = device_pb2.PacingHints(
            poll_interval_ms=20, max_message_bytes=4 << 20, chunk_bytes=CHUNK,
            session_ttl_ms=60_000, long_poll_ms=self.long_poll_ms,
        )  # fmt: skip
        return device_pb2.RegisterResponse(session_id=session, pacing=pacing)

    def GetTask(self, request, context):  # noqa: N802 (gRPC names)
        with self._lock:
            self.get_task_calls += 1
            self.get_task_times.append(time.monotonic())
            self.get_task_capabilities.append(request.capabilities)
            throttle = self.throttle_get_task_ms.pop(0) if self.throttle_get_task_ms else None
            fault = self.get_task_faults.pop(0) if self.get_task_faults else None
            forget = self.forget_sessions > 0
            if forget:
                self.forget_sessions -= 1
                self._sessions.pop(request.session_id, None)
        if throttle is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(throttle)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "injected rate limit")
        if fault is not None:
            context.abort(fault, "injected fault")
        device = self._device(request.session_id, context)
        with self._lock:
            script = self._scripts[device]
            if script:
                return script.pop(0)
        return device_pb2.GetTaskResponse(finished=device_pb2.RunFinished(reason="done"))

    def DownloadModel(self, request, context):  # noqa: N802 (gRPC names)
        self._maybe_restart("DownloadModel", context)
        self._device(request.session_id, context)
        model = self._models.get(request.task_id)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown task '{request.task_id}'")
        if request.offset > len(model):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past the end")
        with self._lock:
            self.download_offsets.append((request.task_id, request.offset))
            cut = self.break_downloads > 0
            self.break_downloads -= int(cut)
            corrupt = self.corrupt_downloads > 0 and request.offset == 0
            self.corrupt_downloads -= int(corrupt)
        digest = hashlib.sha256(model).hexdigest()
        if corrupt:
            model = bytes([model[0] ^ 0xFF]) + model[1:]
        for offset in range(request.offset, len(model), CHUNK):
            yield device_pb2.ModelChunk(
                offset=offset,
                data=model[offset : offset + CHUNK],
                total_size=len(model),
                sha256=digest,
            )
            if cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: connection lost")

    def SubmitUpdate(self, request_iterator, context):  # noqa: N802 (gRPC names)
        self._maybe_restart("SubmitUpdate", context)
        first = next(request_iterator)
        device = self._device(first.header.session_id, context)
        if self.refuse_submissions is not None:
            context.abort(self.refuse_submissions, "injected refusal")
        task_id = first.header.task_id

        def counted():
            for message in request_iterator:
                if message.HasField("tensor"):
                    self.update_chunks.append(len(message.tensor.data))
                yield message

        try:
            header, params = decode_update(
                itertools.chain([first], counted()), self._infos[task_id]
            )
        except MalformedUpdateError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.updates[(device, task_id)] = (header, params)
        return device_pb2.SubmitUpdateResponse(accepted=True, round=1)

    def SubmitEvaluation(self, request, context):  # noqa: N802 (gRPC names)
        device = self._device(request.session_id, context)
        if self.refuse_submissions is not None:
            context.abort(self.refuse_submissions, "injected refusal")
        with self._lock:
            self.evaluations[(device, request.task_id)] = request
        return device_pb2.SubmitEvaluationResponse(accepted=True)


@contextlib.contextmanager
def serve(fake: FakeCoordinator) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=CHANNEL_OPTIONS)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
