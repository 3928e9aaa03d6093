"""A catalogue of malformed and hostile device requests, for injecting into a live run.

``DeviceAttacks`` is what a compromised or buggy app does on its own session while it holds a
real task: every kind of bad submission, download and evaluation, each sent for real over gRPC.
``OutsiderAttacks`` is what a stranger on the network does: calls without or with a bad token,
a stolen token used as another device, garbage bytes on the socket. Each attack records the
status code and message it got back; ``accepted`` means the coordinator took it, which a test
treats as a failure.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from fedcoreml.ios_bridge.channel import bearer_metadata
from fedcoreml.ios_bridge.device_client import DeviceClient, EvaluationResult, RefusedError
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

Chunks = list[device_pb2.UpdateChunk]

# kind -> (status code, a phrase the message must contain)
EXPECTED: dict[str, tuple[str, str]] = {
    "header not first": ("INVALID_ARGUMENT", "the first message must be the update header"),
    "second header": ("INVALID_ARGUMENT", "a second header"),
    "empty stream": ("INVALID_ARGUMENT", "empty update: no header and no tensors"),
    "missing layer": ("INVALID_ARGUMENT", "missing tensor(s): hidden2.bias"),
    "extra layer": ("INVALID_ARGUMENT", "unknown tensor 'conv3.bias'"),
    "layer sent twice": ("INVALID_ARGUMENT", "sent twice"),
    "wrong shape": ("INVALID_ARGUMENT", "expected shape [500, 1152], got [1152, 500]"),
    "float64 bytes": ("INVALID_ARGUMENT", "80 bytes for shape [10], which holds 40 bytes"),
    "bytes short of the shape": ("INVALID_ARGUMENT", "36 bytes for shape [10], which needs 40"),
    "empty tensor": ("INVALID_ARGUMENT", "0 bytes for shape [32]"),
    "NaN": ("INVALID_ARGUMENT", "non-finite value(s)"),
    "Inf": ("INVALID_ARGUMENT", "non-finite value(s)"),
    "wrong tensor count": ("INVALID_ARGUMENT", "announces 7 tensors but 8 arrived"),
    "slices out of order": ("INVALID_ARGUMENT", "expected byte 0"),
    "slice not on a 4-byte boundary": ("INVALID_ARGUMENT", "must start on a 4-byte boundary"),
    "tensors interleaved": ("INVALID_ARGUMENT", "weights' interleaved with 'hidden1.bias'"),
    "truncated stream": ("INVALID_ARGUMENT", "hidden1.weights"),
    "oversized message": ("RESOURCE_EXHAUSTED", ""),
    "zero examples": ("INVALID_ARGUMENT", "num_examples must be positive"),
    "absurd examples": ("INVALID_ARGUMENT", "is implausible"),
    "negative loss": ("INVALID_ARGUMENT", "loss must be a finite"),
    "accuracy out of range": ("INVALID_ARGUMENT", "accuracy must lie in [0, 1]"),
    "unknown task": ("NOT_FOUND", "unknown task id"),
    "unknown session": ("NOT_FOUND", "unknown or expired session"),
    "evaluation for a train task": ("FAILED_PRECONDITION", "is a train task, not an evaluate"),
    "another device's task": ("PERMISSION_DENIED", "was given to another device"),
    "another device's session": ("PERMISSION_DENIED", "another device"),
    "download past the end": ("OUT_OF_RANGE", "past the end"),
    "download another device's model": ("PERMISSION_DENIED", "was given to another device"),
    "stale round": ("FAILED_PRECONDITION", "was already submitted"),  # an earlier round's task
    "replayed submission": ("FAILED_PRECONDITION", "already submitted"),
    "unchanged model (no training)": ("INVALID_ARGUMENT", "nothing was trained"),
    "update for an evaluate task": ("FAILED_PRECONDITION", "is an evaluate task, not a train"),
    "evaluation accuracy out of range": ("INVALID_ARGUMENT", "accuracy must lie in [0, 1]"),
    "no token": ("UNAUTHENTICATED", "token"),
    "unknown token": ("UNAUTHENTICATED", "token"),
    "revoked token": ("UNAUTHENTICATED", "token"),
    "register as another device": ("PERMISSION_DENIED", "cannot register as"),
    "garbage bytes on the socket": ("CONNECTION_DROPPED", ""),
}


@dataclass
class Outcomes:
    """What every attack got back, by kind (thread-safe)."""

    seen: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expect_refusal(self, kind: str, call: Callable[[], object]) -> None:
        try:
            result = call()
            if isinstance(result, Iterator):
                list(result)  # a server stream fails when read
            got = ("accepted", "")
        except grpc.RpcError as exc:
            got = (exc.code().name, exc.details() or "")
        except RefusedError as exc:
            got = (exc.code.name, exc.message)
        with self.lock:
            self.seen.setdefault(kind, []).append(got)

    def record(self, kind: str, code: str) -> None:
        with self.lock:
            self.seen.setdefault(kind, []).append((code, ""))

    def mismatches(self) -> list[str]:
        wrong = []
        for kind, outcomes in self.seen.items():
            code, phrase = EXPECTED[kind]
            for got_code, details in outcomes:
                if got_code != code or phrase not in details:
                    wrong.append(f"{kind}: got {got_code} {details!r}, expected {code} {phrase!r}")
        return wrong


def _tensor(messages: Chunks, name: str) -> device_pb2.TensorChunk:
    return next(m.tensor for m in messages if m.HasField("tensor") and m.tensor.name == name)


def _set_first_value(messages: Chunks, name: str, value: float) -> Chunks:
    tensor = _tensor(messages, name)
    tensor.data = np.array([value], "<f4").tobytes() + tensor.data[4:]
    return messages


@dataclass
class Peers:
    """What devices of one run know of each other (as an attacker that sniffed them would)."""

    tasks: dict[str, str] = field(default_factory=dict)  # device id -> its latest task id
    sessions: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, device_id: str, session: str, task_id: str) -> None:
        with self.lock:
            self.tasks[device_id] = task_id
            self.sessions[device_id] = session

    def other(self, device_id: str) -> tuple[str, str] | None:
        with self.lock:
            others = sorted(d for d in self.tasks if d != device_id)
            return (self.sessions[others[0]], self.tasks[others[0]]) if others else None


class DeviceAttacks:
    """Hooks for a ScriptedDevice: attack its own task before and after its honest submission.

    Submissions and evaluations go through the device's DeviceClient low-level calls (which
    only retry transient failures); the rest are raw stub calls with the device's credentials.
    """

    def __init__(self, device_id: str, outcomes: Outcomes, peers: Peers) -> None:
        self.device_id = device_id
        self.outcomes = outcomes
        self.peers = peers
        self.previous_task: str | None = None

    def before_submit(self, client: DeviceClient, task, sent) -> None:
        stub, session, metadata = client.stub, client.session_id, client.metadata
        self.peers.post(self.device_id, session, task.task_id)
        refuse = self.outcomes.expect_refusal

        def stream(
            params=sent,
            examples=100,
            loss=0.5,
            accuracy=0.5,
            task_id=task.task_id,
            session_id=session,
        ) -> Chunks:
            header = UpdateHeader(session_id, task_id, examples, loss, accuracy, 1.0)
            return list(encode_update(header, params, chunk_bytes=512 * 1024))

        def submit(messages: Chunks) -> Callable[[], object]:
            return lambda: client.submit_update_stream(lambda: messages)

        valid = stream()
        as_dict = dict(sent)
        refuse("header not first", submit(valid[1:]))
        refuse("second header", submit([*valid, valid[0]]))
        refuse("empty stream", submit([]))
        refuse("missing layer", submit(stream(sent[:-1])))
        refuse("extra layer", submit(stream([*sent, ("conv3.bias", np.zeros(32, np.float32))])))
        refuse("layer sent twice", submit([*valid, valid[-1]]))
        transposed = [(n, v.T.copy() if n == "hidden1.weights" else v) for n, v in sent]
        refuse("wrong shape", submit(stream(transposed)))
        wide = stream()
        _tensor(wide, "hidden2.bias").data = as_dict["hidden2.bias"].astype("<f8").tobytes()
        refuse("float64 bytes", submit(wide))
        short = stream()
        _tensor(short, "hidden2.bias").data = _tensor(short, "hidden2.bias").data[:36]
        refuse("bytes short of the shape", submit(short))
        empty = stream()
        _tensor(empty, "conv1.bias").data = b""
        refuse("empty tensor", submit(empty))
        refuse("NaN", submit(_set_first_value(stream(), "conv1.bias", np.nan)))
        refuse("Inf", submit(_set_first_value(stream(), "hidden2.bias", -np.inf)))
        miscounted = stream()
        miscounted[0].header.num_tensors = 7
        refuse("wrong tensor count", submit(miscounted))
        swapped = stream()
        slices = [i for i, m in enumerate(swapped) if m.tensor.name == "hidden1.weights"]
        swapped[slices[0]], swapped[slices[1]] = swapped[slices[1]], swapped[slices[0]]
        refuse("slices out of order", submit(swapped))
        misaligned = stream()
        first_slice = _tensor(misaligned, "hidden1.weights")
        first_slice.data = first_slice.data[:-2]
        refuse("slice not on a 4-byte boundary", submit(misaligned))
        interleaved = stream()
        bias = next(i for i, m in enumerate(interleaved) if m.tensor.name == "hidden1.bias")
        interleaved.insert(slices[0] + 1, interleaved.pop(bias))
        refuse("tensors interleaved", submit(interleaved))
        cut = slices[0] + 2
        refuse("truncated stream", submit(valid[:cut]))
        huge = device_pb2.UpdateChunk(
            tensor=device_pb2.TensorChunk(
                name="hidden1.weights", shape=[500, 1152], data=b"\0" * (5 * 1024 * 1024)
            )
        )
        refuse("oversized message", submit([valid[0], huge]))
        refuse("zero examples", submit(stream(examples=0)))
        refuse("absurd examples", submit(stream(examples=10**12)))
        refuse("negative loss", submit(stream(loss=-1.0)))
        refuse("accuracy out of range", submit(stream(accuracy=1.5)))
        refuse("unknown task", submit(stream(task_id="f" * 24)))
        refuse("unknown session", submit(stream(session_id="not-a-session")))
        refuse("evaluation for a train task", _evaluation(client, task.task_id, 0.5))
        refuse(
            "download past the end",
            lambda: stub.DownloadModel(
                device_pb2.DownloadModelRequest(
                    session_id=session, task_id=task.task_id, offset=task.model.size_bytes + 1
                ),
                metadata=metadata,
            ),
        )
        other = self.peers.other(self.device_id)
        if other is not None:
            other_session, other_task = other
            refuse("another device's task", submit(stream(task_id=other_task)))
            refuse(
                "download another device's model",
                lambda: stub.DownloadModel(
                    device_pb2.DownloadModelRequest(session_id=session, task_id=other_task),
                    metadata=metadata,
                ),
            )
            refuse(
                "another device's session",
                lambda: stub.GetTask(
                    device_pb2.GetTaskRequest(session_id=other_session), metadata=metadata
                ),
            )
        if self.previous_task is not None:
            refuse("stale round", submit(stream(task_id=self.previous_task)))
        shipped = client.download_model(task.task_id, task.model)
        refuse("unchanged model (no training)",
               submit(stream(get_parameters(spec_from_bytes(shipped)))))  # fmt: skip
        self._valid = valid

    def after_submit(self, client: DeviceClient, task, sent) -> None:
        valid = self._valid
        self.outcomes.expect_refusal(
            "replayed submission", lambda: client.submit_update_stream(lambda: valid)
        )
        self.previous_task = task.task_id

    def before_evaluation(self, client: DeviceClient, task, _sent) -> None:
        refuse = self.outcomes.expect_refusal
        header = UpdateHeader(client.session_id, task.task_id, 10, 0.5, 0.5, 1.0)
        params = [("conv1.bias", np.zeros(32, np.float32))]
        refuse(
            "update for an evaluate task",
            lambda: client.submit_update_stream(lambda: encode_update(header, params)),
        )
        refuse("evaluation accuracy out of range", _evaluation(client, task.task_id, -0.2))


class OutsiderAttacks:
    """A stranger hammering the port while the run goes on, until stopped."""

    def __init__(
        self, address: str, outcomes: Outcomes, revoked_token: str, stolen: tuple[str, str]
    ) -> None:
        self.address = address
        self.outcomes = outcomes
        self.revoked_token = revoked_token
        self.stolen_device, self.stolen_token = stolen  # a device, and its valid token

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.once()
            stop.wait(0.2)

    def once(self) -> None:
        host, port = self.address.rsplit(":", 1)
        for payload in (bytes(range(256)) * 64, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff" * 100):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(payload)
            self.outcomes.record("garbage bytes on the socket", "CONNECTION_DROPPED")
        with grpc.insecure_channel(self.address) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            for kind, metadata in (
                ("no token", ()),
                ("unknown token", bearer_metadata("fcml_" + "x" * 40)),
                ("revoked token", bearer_metadata(self.revoked_token)),
            ):
                for call in _every_rpc(stub, metadata):
                    self.outcomes.expect_refusal(kind, call)
            self.outcomes.expect_refusal(
                "register as another device",
                lambda: stub.Register(
                    device_pb2.RegisterRequest(device_id=self.stolen_device + "-evil"),
                    metadata=bearer_metadata(self.stolen_token),
                ),
            )


def _evaluation(client: DeviceClient, task_id: str, accuracy: float) -> Callable[[], object]:
    return lambda: client.submit_evaluation(task_id, EvaluationResult(10, 0.1, accuracy))


def _every_rpc(stub, metadata) -> list[Callable[[], object]]:
    header = device_pb2.UpdateChunk(header=device_pb2.UpdateHeader(session_id="s", task_id="t"))
    return [
        lambda: stub.Register(device_pb2.RegisterRequest(device_id="x"), metadata=metadata),
        lambda: stub.GetTask(device_pb2.GetTaskRequest(session_id="s"), metadata=metadata),
        lambda: stub.DownloadModel(
            device_pb2.DownloadModelRequest(session_id="s", task_id="t"), metadata=metadata
        ),
        lambda: stub.SubmitUpdate(iter([header]), metadata=metadata),
        lambda: stub.SubmitEvaluation(
            device_pb2.SubmitEvaluationRequest(session_id="s", task_id="t"), metadata=metadata
        ),
    ]
