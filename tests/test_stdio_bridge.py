"""The stdio bridge (ios_bridge/stdio_bridge.py) as a child process, against the fake coordinator.

The Swift kit reaches a real coordinator on Linux through this bridge, so each test drives the
bridge exactly as the Swift transport does: JSON lines in, JSON lines out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_coordinator import MODEL_0, FakeCoordinator, serve, train

from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters

TIMEOUT_S = 30


class BridgeProcess:
    """The bridge as a child process; replies are collected per call id."""

    def __init__(self, address: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedcoreml.ios_bridge.stdio_bridge", "--server", address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.replies: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _queue(self, call_id: Any) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            return self.replies.setdefault(call_id, queue.Queue())

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            reply = json.loads(line)
            self._queue(reply.get("id")).put(reply)

    def send(self, line: dict[str, Any] | str) -> None:
        assert self.process.stdin is not None
        text = line if isinstance(line, str) else json.dumps(line)
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def reply(self, call_id: Any) -> dict[str, Any]:
        return self._queue(call_id).get(timeout=TIMEOUT_S)

    def call(self, call_id: int, rpc: str, request: dict[str, Any]) -> dict[str, Any]:
        self.send({"id": call_id, "call": rpc, "request": request, "timeoutMs": 20_000})
        return self.reply(call_id)

    def stream(self, call_id: int) -> list[dict[str, Any]]:
        """The replies of a server stream up to its end or error."""
        replies = []
        while True:
            reply = self.reply(call_id)
            replies.append(reply)
            if "message" not in reply:
                return replies

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=TIMEOUT_S)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator([train("t1", MODEL_0)], {"t1": MODEL_0})


@pytest.fixture
def bridge(fake: FakeCoordinator) -> Iterator[BridgeProcess]:
    with serve(fake) as address:
        process = BridgeProcess(address)
        try:
            yield process
        finally:
            assert process.close() == 0


def _register(bridge: BridgeProcess) -> str:
    reply = bridge.call(1, "Register", {"deviceId": "swift-0", "platform": "iOS"})
    return reply["response"]["sessionId"]


def _update_lines(session: str, offset: float) -> list[dict[str, Any]]:
    """An update of MODEL_0's parameters plus ``offset``, as proto3 JSON messages."""
    parameters = get_parameters(spec_from_bytes(MODEL_0))
    header = {
        "sessionId": session,
        "taskId": "t1",
        "numExamples": "120",
        "loss": 0.5,
        "accuracy": 0.75,
        "trainSeconds": 1.5,
        "numTensors": len(parameters),
    }
    lines = [{"header": header}]
    for name, value in parameters:
        data = (value + np.float32(offset)).astype("<f4").tobytes()
        lines.append(
            {
                "tensor": {
                    "name": name,
                    "shape": list(value.shape),
                    "offset": "0",
                    "data": base64.b64encode(data).decode(),
                }
            }
        )
    return lines


def test_a_whole_task_goes_through_the_bridge(bridge: BridgeProcess, fake: FakeCoordinator):
    session = _register(bridge)
    task = bridge.call(2, "GetTask", {"sessionId": session})["response"]["train"]
    assert task["taskId"] == "t1" and task["model"]["sizeBytes"] == str(len(MODEL_0))

    bridge.send(
        {"id": 3, "call": "DownloadModel", "request": {"sessionId": session, "taskId": "t1"}}
    )
    replies = bridge.stream(3)
    assert replies[-1] == {"id": 3, "end": True}
    data = b"".join(base64.b64decode(r["message"]["data"]) for r in replies[:-1])
    assert hashlib.sha256(data).hexdigest() == task["model"]["sha256"]

    bridge.send({"id": 4, "call": "SubmitUpdate", "timeoutMs": 20_000})
    for message in _update_lines(session, 0.25):
        bridge.send({"id": 4, "message": message})
    bridge.send({"id": 4, "end": True})
    assert bridge.reply(4) == {"id": 4, "response": {"accepted": True, "round": 1}}

    header, params = fake.updates[("swift-0", "t1")]
    assert (header.num_examples, header.loss, header.accuracy) == (120, 0.5, 0.75)
    for (name, sent), (_, expected) in zip(
        params, get_parameters(spec_from_bytes(MODEL_0)), strict=True
    ):
        np.testing.assert_array_equal(sent, expected + np.float32(0.25), err_msg=name)


def test_refusals_carry_their_status_message_and_retry_after(
    bridge: BridgeProcess, fake: FakeCoordinator
):
    session = _register(bridge)
    fake.throttle_get_task_ms = [250]
    assert bridge.call(2, "GetTask", {"sessionId": session})["error"] == {
        "status": "RESOURCE_EXHAUSTED",
        "message": "injected rate limit",
        "retryAfterMs": 250,
    }
    error = bridge.call(3, "GetTask", {"sessionId": "nobody"})["error"]
    assert error == {"status": "NOT_FOUND", "message": "unknown session 'nobody'"}
    bridge.send(
        {"id": 4, "call": "DownloadModel", "request": {"sessionId": session, "taskId": "x"}}
    )
    assert bridge.stream(4)[-1]["error"]["status"] == "NOT_FOUND"


def test_a_cancelled_upload_is_cut_on_the_wire_not_completed(
    bridge: BridgeProcess, fake: FakeCoordinator
):
    session = _register(bridge)
    bridge.call(2, "GetTask", {"sessionId": session})
    lines = _update_lines(session, 0.25)
    bridge.send({"id": 3, "call": "SubmitUpdate", "timeoutMs": 20_000})
    for message in lines[:-1]:  # every tensor but the last
        bridge.send({"id": 3, "message": message})
    bridge.send({"id": 3, "cancel": True})
    assert bridge.reply(3)["error"]["status"] == "CANCELLED"
    assert fake.updates == {}

    # Nothing of it counted: the whole update, sent again, is the first the coordinator sees.
    bridge.send({"id": 4, "call": "SubmitUpdate"})
    for message in lines:
        bridge.send({"id": 4, "message": message})
    bridge.send({"id": 4, "end": True})
    assert bridge.reply(4)["response"]["accepted"] is True
    assert list(fake.updates) == [("swift-0", "t1")]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "not JSON"),
        ('{"call": "Register"}', "id: expected an integer"),
        ('{"id": 5, "call": "Fetch"}', "unknown call 'Fetch'"),
        ('{"id": 5, "call": "Register", "request": {"deviceId": 7}}', "Register request"),
        ('{"id": 5, "call": "GetTask", "timeoutMs": -1}', "timeoutMs"),
        ('{"id": 5, "call": "GetTask", "metadata": {"a": "b"}}', "metadata"),
        ('{"id": 5, "call": "ModelParameters"}', "expected a file path"),
    ],
)
def test_a_line_the_bridge_cannot_act_on_answers_a_bridge_error(
    bridge: BridgeProcess, line: str, says: str
):
    bridge.send(line)
    call_id = json.loads(line).get("id") if line.startswith("{") else None
    reply = bridge.reply(call_id)
    assert says in reply["bridgeError"], reply


def test_model_parameters_reads_a_model_file_as_the_coordinator_does(
    bridge: BridgeProcess, tmp_path: Path
):
    path = tmp_path / "m.mlmodel"
    path.write_bytes(MODEL_0)
    bridge.send({"id": 9, "call": "ModelParameters", "path": str(path)})
    tensors = bridge.reply(9)["response"]["tensors"]
    expected = get_parameters(spec_from_bytes(MODEL_0))
    assert [t["name"] for t in tensors] == [name for name, _ in expected]
    for tensor, (name, value) in zip(tensors, expected, strict=True):
        assert tensor["shape"] == list(value.shape), name
        decoded = np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape(value.shape)
        np.testing.assert_array_equal(decoded, value)
    bridge.send({"id": 10, "call": "ModelParameters", "path": str(tmp_path / "none.mlmodel")})
    assert "no such model file" in bridge.reply(10)["bridgeError"]


def test_the_bridge_imports_nothing_from_the_coordinator_or_the_simulator(tmp_path: Path):
    path = tmp_path / "m.mlmodel"
    path.write_bytes(MODEL_0)
    code = (
        "import sys; from fedcoreml.ios_bridge import stdio_bridge as b;"
        f"b.model_parameters({str(path)!r});"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['fedcoreml', 'server'], ['fedcoreml', 'client_sim'])];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=TIMEOUT_S).returncode == 0


def test_unreachable_coordinator_is_unavailable():
    process = BridgeProcess("127.0.0.1:1")
    try:
        reply = process.call(1, "Register", {"deviceId": "swift-0"})
        assert reply["error"]["status"] == "UNAVAILABLE"
    finally:
        assert process.close() == 0


def test_layout_lists_every_updatable_tensor_with_its_core_ml_shape(tmp_path: Path):
    path = tmp_path / "m.mlmodel"
    path.write_bytes(MODEL_0)
    printed = subprocess.run(
        [sys.executable, "-m", "fedcoreml.ios_bridge.stdio_bridge", "--layout", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    ).stdout
    expected = get_parameters(spec_from_bytes(MODEL_0))
    assert json.loads(printed) == {
        "tensors": [{"name": name, "shape": list(value.shape)} for name, value in expected]
    }
    missing = subprocess.run(
        [sys.executable, "-m", "fedcoreml.ios_bridge.stdio_bridge", "--layout", "none.mlmodel"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert missing.returncode == 2 and "no such model file" in missing.stderr
