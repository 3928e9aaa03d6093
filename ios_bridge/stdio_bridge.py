"""The device protocol's gRPC calls, driven by newline-delimited JSON on stdin.

A device written in another language that has no gRPC library at hand (the Swift kit's tests on
Linux, ``ios_bridge/swift``) runs this as a child process and writes one JSON object per line;
each names a call and carries its request in the proto3 JSON mapping
(``google.protobuf.json_format``). The bridge makes the real call to the coordinator over one
channel and answers with JSON lines on stdout. Calls run concurrently, each on a thread::

    -> {"id": 1, "call": "Register", "request": {...}, "metadata": [["k", "v"]], "timeoutMs": 60000}
    <- {"id": 1, "response": {...}}
    -> {"id": 2, "call": "DownloadModel", "request": {...}}
    <- {"id": 2, "message": {...}} ... {"id": 2, "end": true}
    -> {"id": 3, "call": "SubmitUpdate"}      opens a client stream, then
    -> {"id": 3, "message": {...}} ... {"id": 3, "end": true}
    <- {"id": 3, "response": {...}}
    -> {"id": 2, "cancel": true}              cancels call 2 on the wire
    <- {"id": 1, "error": {"status": "UNAVAILABLE", "message": "...", "retryAfterMs": 250}}
    -> {"id": 4, "call": "ModelParameters", "path": "m.mlmodel"}
    <- {"id": 4, "response": {"tensors": [{"name": ..., "shape": [...], "data": "<base64>"}]}}

A refused call answers ``error`` with the gRPC status name, its message and the rate limit's
``retry-after-ms`` trailing metadata when present; a line the bridge cannot act on answers
``bridgeError``. ``ModelParameters`` reads a model file's updatable tensors (float32
little-endian, Core ML layout) the way the coordinator does, for checks. When stdin closes, the
calls in flight are cancelled and the bridge exits.

    python -m fedcoreml.ios_bridge.stdio_bridge --server 127.0.0.1:50051 [--ca-cert ca.pem]

``--layout MODEL`` instead prints the model's updatable tensors (names and Core ML shapes), the
JSON an iOS app bundles for the Swift kit's ``ModelLayout``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from fedcoreml.ios_bridge.channel import RETRY_AFTER_KEY, TLSConfigError, open_channel
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc

__all__ = ["Bridge", "layout", "main", "model_parameters"]

#: Calls with one request message: their request type.
UNARY_REQUESTS: dict[str, type[Message]] = {
    "Register": device_pb2.RegisterRequest,
    "GetTask": device_pb2.GetTaskRequest,
    "SubmitEvaluation": device_pb2.SubmitEvaluationRequest,
    "DownloadModel": device_pb2.DownloadModelRequest,
}
_END = object()  # closes a client stream's queue
_CANCEL = object()  # cuts it


class BridgeRequestError(ValueError):
    """A request line the bridge cannot act on (the message says why)."""


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def _parse(payload: object, message_type: type[Message], what: str) -> Message:
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BridgeRequestError(f"{what}: expected a JSON object, got {type(payload).__name__}")
    try:
        return json_format.ParseDict(payload, message_type())
    except json_format.ParseError as exc:
        raise BridgeRequestError(f"{what}: {exc}") from None


def _metadata(line: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    pairs = line.get("metadata")
    if pairs is None:
        return None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs
    ):
        raise BridgeRequestError('metadata: expected [["key", "value"], ...]')
    return tuple((key.lower(), value) for key, value in pairs)


def _timeout_s(line: dict[str, Any]) -> float | None:
    millis = line.get("timeoutMs")
    if millis is None:
        return None
    if isinstance(millis, bool) or not isinstance(millis, int) or millis <= 0:
        raise BridgeRequestError(f"timeoutMs: expected a positive integer, got {millis!r}")
    return millis / 1000


def _status(exc: grpc.RpcError) -> dict[str, Any]:
    """An ``error`` body: status name, message, and the rate limit's retry-after if any."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    body: dict[str, Any] = {
        "status": code.name,
        "message": (exc.details() if hasattr(exc, "details") else str(exc)) or "",
    }
    trailing = getattr(exc, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError):  # a malformed hint: no hint
                body["retryAfterMs"] = max(0, int(value))
    return body


def _cancelled() -> dict[str, Any]:
    return {"status": "CANCELLED", "message": "cancelled by the caller"}


def model_parameters(path: str) -> dict[str, Any]:
    """The updatable tensors of a model file, as the coordinator reads them."""
    # Imported here: coremltools' protobuf modules load slowly, and only this helper needs them.
    from fedcoreml.ios_bridge.errors import FedCoreMLError
    from fedcoreml.ios_bridge.mlmodel_io import load_spec
    from fedcoreml.ios_bridge.parameters import get_parameters

    try:
        parameters = get_parameters(load_spec(path))
    except FedCoreMLError as exc:
        raise BridgeRequestError(f"ModelParameters: {exc}") from None
    return {
        "tensors": [
            {
                "name": name,
                "shape": [int(d) for d in value.shape],
                "data": base64.b64encode(value.astype("<f4").tobytes()).decode("ascii"),
            }
            for name, value in parameters
        ]
    }


class _Upload:
    """A client stream in flight: the messages still to send, and the call to cancel."""

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue()
        self.future: grpc.Future | None = None
        self.cancelled = threading.Event()

    def messages(self) -> Iterator[device_pb2.UpdateChunk]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if item is _CANCEL:
                # Raising here makes gRPC cancel the call rather than half-close it.
                raise RuntimeError("upload cancelled by the caller")
            yield item  # type: ignore[misc]


class Bridge:
    """Reads request lines, makes the calls on ``stub``, writes reply lines to ``out``."""

    def __init__(self, stub: device_pb2_grpc.DeviceServiceStub, out: TextIO) -> None:
        self._stub = stub
        self._out = out
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cancels: dict[int, Callable[[], None]] = {}  # calls in flight
        self._uploads: dict[int, _Upload] = {}
        self._threads: list[threading.Thread] = []

    def send(self, reply: dict[str, Any]) -> None:
        line = json.dumps(reply, separators=(",", ":"))
        with self._write_lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the reader is gone; stdin will close too

    def handle(self, raw: str) -> None:
        """Acts on one request line."""
        call_id: Any = None
        try:
            try:
                line = json.loads(raw)
            except ValueError as exc:
                raise BridgeRequestError(f"not JSON ({exc})") from None
            if not isinstance(line, dict):
                raise BridgeRequestError("expected a JSON object per line")
            call_id = line.get("id")
            if isinstance(call_id, bool) or not isinstance(call_id, int):
                raise BridgeRequestError(f"id: expected an integer, got {call_id!r}")
            self._dispatch(call_id, line)
        except BridgeRequestError as exc:
            self.send({"id": call_id, "bridgeError": str(exc)})

    def _dispatch(self, call_id: int, line: dict[str, Any]) -> None:
        if line.get("cancel") is True:
            self._cancel(call_id)
            return
        if "message" in line or line.get("end") is True:
            self._feed(call_id, line)
            return
        call = line.get("call")
        with self._lock:
            if call_id in self._cancels:
                raise BridgeRequestError(f"id {call_id} is already in use by a call in flight")
        if call in UNARY_REQUESTS:
            request = _parse(line.get("request"), UNARY_REQUESTS[call], f"{call} request")
            metadata, timeout = _metadata(line), _timeout_s(line)
            if call == "DownloadModel":
                self._start(call_id, self._download, request, metadata, timeout)
            else:
                self._start(call_id, self._unary, call, request, metadata, timeout)
        elif call == "SubmitUpdate":
            metadata, timeout = _metadata(line), _timeout_s(line)
            upload = _Upload()  # registered now: its messages follow on the next lines
            with self._lock:
                self._uploads[call_id] = upload
            self._start(call_id, self._upload, upload, metadata, timeout)
        elif call == "ModelParameters":
            path = line.get("path")
            if not isinstance(path, str) or not path:
                raise BridgeRequestError("ModelParameters: expected a file path in 'path'")
            self._start(call_id, self._parameters, path)
        else:
            known = ", ".join([*UNARY_REQUESTS, "SubmitUpdate", "ModelParameters"])
            raise BridgeRequestError(f"unknown call {call!r}; the calls are {known}")

    def _start(self, call_id: int, target: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._cancels[call_id] = lambda: None  # replaced once the call exists
        thread = threading.Thread(
            target=self._run, args=(call_id, target, *args), name=f"call-{call_id}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _run(self, call_id: int, target: Callable[..., None], *args: Any) -> None:
        try:
            target(call_id, *args)
        except BridgeRequestError as exc:
            self.send({"id": call_id, "bridgeError": str(exc)})
        except Exception as exc:  # a bug here must still answer the caller
            self.send({"id": call_id, "bridgeError": f"{type(exc).__name__}: {exc}"})
        finally:
            with self._lock:
                self._cancels.pop(call_id, None)
                self._uploads.pop(call_id, None)

    def _on_cancel(self, call_id: int, cancel: Callable[[], None]) -> bool:
        """Registers how to cancel a call; False if it was cancelled already."""
        with self._lock:
            if call_id not in self._cancels:
                return False
            self._cancels[call_id] = cancel
            return True

    def _cancel(self, call_id: int) -> None:
        with self._lock:
            cancel = self._cancels.pop(call_id, None)
            upload = self._uploads.get(call_id)
        if upload is not None:
            upload.cancelled.set()
            upload.queue.put(_CANCEL)
        if cancel is not None:
            cancel()

    def _unary(self, call_id: int, rpc: str, request: Message, metadata, timeout) -> None:
        future = getattr(self._stub, rpc).future(request, timeout=timeout, metadata=metadata)
        self._answer(call_id, future, lambda: False)

    def _download(self, call_id: int, request: Message, metadata, timeout) -> None:
        stream = self._stub.DownloadModel(request, timeout=timeout, metadata=metadata)
        if not self._on_cancel(call_id, stream.cancel):
            stream.cancel()
        try:
            for chunk in stream:
                self.send({"id": call_id, "message": _to_json(chunk)})
            self.send({"id": call_id, "end": True})
        except grpc.RpcError as exc:
            self.send({"id": call_id, "error": _status(exc)})

    def _upload(self, call_id: int, upload: _Upload, metadata, timeout) -> None:
        future = self._stub.SubmitUpdate.future(
            upload.messages(), timeout=timeout, metadata=metadata
        )
        self._answer(call_id, future, upload.cancelled.is_set)

    def _answer(self, call_id: int, future, cancelled_by_client: Callable[[], bool]) -> None:
        """Send a unary answer's response or error line; a call the client cut is "cancelled"."""
        if not self._on_cancel(call_id, future.cancel):
            future.cancel()
        try:
            self.send({"id": call_id, "response": _to_json(future.result())})
        except grpc.FutureCancelledError:
            self.send({"id": call_id, "error": _cancelled()})
        except grpc.RpcError as exc:
            body = _cancelled() if cancelled_by_client() else _status(exc)
            self.send({"id": call_id, "error": body})

    def _feed(self, call_id: int, line: dict[str, Any]) -> None:
        with self._lock:
            upload = self._uploads.get(call_id)
        if upload is None:
            return  # the call has ended (answered or cancelled): drop what still comes
        if line.get("end") is True:
            upload.queue.put(_END)
            return
        upload.queue.put(_parse(line["message"], device_pb2.UpdateChunk, "SubmitUpdate message"))

    def _parameters(self, call_id: int, path: str) -> None:
        self.send({"id": call_id, "response": model_parameters(path)})

    def close(self) -> None:
        """Cancels every call in flight and waits (briefly) for their threads."""
        with self._lock:
            in_flight = list(self._cancels)
        for call_id in in_flight:
            self._cancel(call_id)
        for thread in self._threads:
            thread.join(timeout=5)


def serve(stub: device_pb2_grpc.DeviceServiceStub, lines: TextIO, out: TextIO) -> None:
    """Runs the bridge until ``lines`` ends."""
    bridge = Bridge(stub, out)
    try:
        for raw in lines:
            if raw.strip():
                bridge.handle(raw)
    finally:
        bridge.close()


def layout(path: str) -> dict[str, Any]:
    """A model's updatable tensors by name and Core ML shape: the Swift kit's ModelLayout."""
    tensors = model_parameters(path)["tensors"]
    return {"tensors": [{"name": t["name"], "shape": t["shape"]} for t in tensors]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedcoreml.ios_bridge.stdio_bridge",
        description="Make the device protocol's gRPC calls asked for as JSON lines on stdin.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", metavar="HOST:PORT", help="the coordinator")
    mode.add_argument(
        "--layout",
        metavar="MODEL",
        help="print the model's updatable tensors (names, Core ML shapes) as the JSON an app "
        "bundles for the Swift kit's ModelLayout, and exit",
    )
    parser.add_argument("--ca-cert", help="PEM CA certificate: connect over TLS")
    args = parser.parse_args(argv)
    if args.layout is not None:
        try:
            print(json.dumps(layout(args.layout), indent=1))
        except BridgeRequestError as exc:
            print(f"stdio_bridge: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        channel = open_channel(args.server, args.ca_cert)
    except TLSConfigError as exc:
        print(f"stdio_bridge: {exc}", file=sys.stderr)
        return 2
    with channel:
        lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
        serve(device_pb2_grpc.DeviceServiceStub(channel), lines, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
