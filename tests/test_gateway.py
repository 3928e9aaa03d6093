"""The gateway refuses bad requests with the right status, keeps serving, and stays clean."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from live_gateway import Gateway

from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc
from fedcoreml.server.gateway.service import DeviceService, start_server
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard, TaskConfig

SPEC = build_default_model(seed=0)
SHIPPED = get_parameters(SPEC)
PARAMS = [(n, v + np.float32(0.01)) for n, v in SHIPPED]  # what a device trained
MODEL = RoundModel.from_bytes(0, spec_to_bytes(SPEC))
CONFIG = TaskConfig(epochs=1, batch_size=32, learning_rate=1e-3)


@pytest.fixture
def gw():
    gateway = Gateway()
    yield gateway
    gateway.close()


def submit(gw, session, task_id, params=PARAMS, examples=100, loss=0.5, accuracy=0.5, seconds=1.0):
    header = UpdateHeader(session, task_id, examples, loss, accuracy, seconds)
    return gw.stub.SubmitUpdate(encode_update(header, params))


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_a_full_valid_exchange(gw):
    session, node = gw.register("phone-a")
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.WhichOneof("task") == "wait" and reply.wait.retry_after_ms == 50
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.train.task_id == task.task_id and reply.train.config.batch_size == 32
    assert reply.train.model.sha256 == MODEL.sha256
    chunks = list(gw.stub.DownloadModel(device_pb2.DownloadModelRequest(
        session_id=session, task_id=task.task_id)))  # fmt: skip
    assert b"".join(c.data for c in chunks) == MODEL.data
    assert all(len(c.data) <= 1024 * 1024 for c in chunks)
    resumed = list(gw.stub.DownloadModel(device_pb2.DownloadModelRequest(
        session_id=session, task_id=task.task_id, offset=1_500_000)))  # fmt: skip
    assert b"".join(c.data for c in resumed) == MODEL.data[1_500_000:]
    assert submit(gw, session, task.task_id).accepted
    done = gw.board.take([task.task_id])[0]
    assert done.status == "submitted" and done.result.num_examples == 100


def _nan_params():
    params = [(n, v.copy()) for n, v in PARAMS]
    params[0][1][0, 0, 0, 0] = np.nan
    return params


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unknown session", "NOT_FOUND", "unknown or expired session"),
        ("unknown task", "NOT_FOUND", "unknown task id"),
        ("another device's task", "PERMISSION_DENIED", "was given to another device"),
        ("evaluate task", "FAILED_PRECONDITION", "is an evaluate task, not a train task"),
        ("closed round", "FAILED_PRECONDITION", "is closed (round closed)"),
        ("submitted twice", "FAILED_PRECONDITION", "was already submitted"),
        ("unchanged model", "INVALID_ARGUMENT", "unchanged: nothing was trained"),
        ("missing layer", "INVALID_ARGUMENT", "missing tensor(s): hidden2.bias"),
        ("wrong shape", "INVALID_ARGUMENT", "expected shape [500, 1152], got [1152, 500]"),
        ("NaN", "INVALID_ARGUMENT", "non-finite value(s)"),
        ("zero examples", "INVALID_ARGUMENT", "num_examples must be positive"),
        ("absurd examples", "INVALID_ARGUMENT", "is implausible"),
        ("NaN loss", "INVALID_ARGUMENT", "loss must be a finite"),
        ("accuracy 1.5", "INVALID_ARGUMENT", "accuracy must lie in [0, 1]"),
        ("negative seconds", "INVALID_ARGUMENT", "train_seconds must be a finite, non-negative"),
    ],
)
def test_bad_submissions_are_refused_and_leave_the_task_untouched(gw, case, code, message):
    session, node = gw.register("phone-a")
    other_session, _other_node = gw.register("phone-b")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    task_id, sender, params, extra = task.task_id, session, PARAMS, {}
    if case == "unknown session":
        sender = "nope"
    elif case == "unknown task":
        task_id = "nope"
    elif case == "another device's task":
        sender = other_session
    elif case == "evaluate task":
        task_id = gw.board.assign(node, "evaluate", 1, MODEL, None, 30).task_id
    elif case == "closed round":
        gw.board.close([task_id], "round closed")
    elif case == "submitted twice":
        submit(gw, session, task_id)
    elif case == "unchanged model":
        params = SHIPPED
    elif case == "missing layer":
        params = PARAMS[:-1]
    elif case == "wrong shape":
        params = [(n, v.T.copy() if n == "hidden1.weights" else v) for n, v in PARAMS]
    elif case == "NaN":
        params = _nan_params()
    elif case == "zero examples":
        extra = {"examples": 0}
    elif case == "absurd examples":
        extra = {"examples": 10**12}
    elif case == "NaN loss":
        extra = {"loss": float("nan")}
    elif case == "accuracy 1.5":
        extra = {"accuracy": 1.5}
    elif case == "negative seconds":
        extra = {"seconds": -1.0}
    got_code, details = status_of(lambda: submit(gw, sender, task_id, params, **extra))
    assert got_code.name == code and message in details
    state = gw.board._tasks.get(task.task_id)
    if case == "submitted twice":
        assert state.result is not None and state.result.num_examples == 100  # the first one
    elif case == "closed round":
        assert state.status == "failed" and state.result is None
    else:
        assert state.status == "pending" and state.result is None
    # still serving: a valid submission from the same device now goes through
    if state.status == "pending":
        assert submit(gw, session, task.task_id).accepted


def test_download_errors(gw):
    session, node = gw.register("phone-a")
    other, _ = gw.register("phone-b")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)

    def download(session_id, task_id, offset=0):
        return list(gw.stub.DownloadModel(device_pb2.DownloadModelRequest(
            session_id=session_id, task_id=task_id, offset=offset)))  # fmt: skip

    code, details = status_of(lambda: download(session, task.task_id, len(MODEL.data) + 1))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "past the end" in details
    code, _ = status_of(lambda: download(other, task.task_id))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = status_of(lambda: download(session, "missing"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_evaluation_checks(gw):
    session, node = gw.register("phone-a")
    task = gw.board.assign(node, "evaluate", 1, MODEL, None, 30)

    def evaluate(**kw):
        fields = {"session_id": session, "task_id": task.task_id, "num_examples": 10,
                  "loss": 0.2, "accuracy": 0.9, **kw}  # fmt: skip
        return gw.stub.SubmitEvaluation(device_pb2.SubmitEvaluationRequest(**fields))

    code, _ = status_of(lambda: evaluate(accuracy=-0.1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert evaluate().accepted
    code, _ = status_of(lambda: evaluate())
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_register_validates_the_device_id(gw):
    code, details = status_of(lambda: gw.stub.Register(device_pb2.RegisterRequest(device_id="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "device_id" in details


def test_idle_devices_expire_and_must_register_again():
    clock = [0.0]
    registry = SessionRegistry(idle_ttl_s=5, clock=lambda: clock[0])
    session = registry.register("phone")
    assert registry.live_node_ids() == [session.node_id]
    clock[0] = 6.0
    assert registry.live_node_ids() == []
    with pytest.raises(Exception, match="unknown or expired session"):
        registry.touch(session.session_id)
    again = registry.register("phone")
    assert again.node_id == session.node_id and registry.live_node_ids() == [session.node_id]
    registry.hold(session.node_id, until=20.0)
    clock[0] = 15.0
    assert registry.is_live(session.node_id)  # working on a task


def test_an_idle_device_is_handed_work_as_soon_as_it_exists(gw):
    session, node = gw.register("phone-a")
    gw.service.long_poll_ms = 5000
    import threading

    timer = threading.Timer(0.3, lambda: gw.board.assign(node, "train", 1, MODEL, CONFIG, 30))
    timer.start()
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session), timeout=10)
    assert reply.WhichOneof("task") == "train"  # not "wait": the call waited for the task


def test_hostile_transport_level_input_leaves_the_gateway_serving(gw):
    import socket

    session, node = gw.register("phone-a")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    port = gw.port
    # garbage bytes on the socket, then a half-open HTTP/2 preface
    for payload in (bytes(range(256)) * 64, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(payload)
    # an oversized message (5 MiB in one chunk) is refused by the transport
    huge = device_pb2.UpdateChunk(tensor=device_pb2.TensorChunk(
        name="hidden1.weights", shape=[500, 1152], data=b"\0" * (5 * 1024 * 1024)))  # fmt: skip
    header = device_pb2.UpdateChunk(header=device_pb2.UpdateHeader(
        session_id=session, task_id=task.task_id, num_examples=10, num_tensors=8))  # fmt: skip
    code, _ = status_of(lambda: gw.stub.SubmitUpdate(iter([header, huge])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a stream that stops in the middle of a tensor
    messages = list(encode_update(UpdateHeader(session, task.task_id, 10, 0.1, 0.5, 1.0), PARAMS,
                                  chunk_bytes=512 * 1024))  # fmt: skip
    cut = next(i for i, m in enumerate(messages) if m.tensor.name == "hidden1.weights") + 2
    code, details = status_of(lambda: gw.stub.SubmitUpdate(iter(messages[:cut])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hidden1.weights" in details
    # an empty tensor
    empty = [(n, v) for n, v in PARAMS]
    messages = list(encode_update(UpdateHeader(session, task.task_id, 10, 0.1, 0.5, 1.0), empty))
    next(m for m in messages if m.tensor.name == "conv1.bias").tensor.data = b""
    code, details = status_of(lambda: gw.stub.SubmitUpdate(iter(messages)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "0 bytes for shape [32]" in details
    # through all of it the task stayed open, and an honest update still goes through
    assert gw.board._tasks[task.task_id].status == "pending"
    assert submit(gw, session, task.task_id).accepted


def test_bulk_transfers_never_queue_ahead_of_small_calls():
    """Uploads that hold every transfer thread leave GetTask answered at once."""
    import threading

    registry, board = SessionRegistry(idle_ttl_s=30), TaskBoard()
    service = DeviceService(registry, board, parameter_infos(SPEC), 50, long_poll_ms=0)
    server, port = start_server(service, "127.0.0.1:0", max_workers=2, transfer_workers=1)
    release = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    try:
        sessions = []
        for name in ("slow-a", "slow-b", "quick"):
            session = stub.Register(device_pb2.RegisterRequest(device_id=name)).session_id
            node = registry.touch(session).node_id
            sessions.append((session, board.assign(node, "train", 1, MODEL, CONFIG, 30)))

        def stalled_upload(session, task):
            header = UpdateHeader(session, task.task_id, 10, 0.1, 0.5, 1.0)
            messages = list(encode_update(header, PARAMS))

            def stream():
                yield messages[0]
                release.wait(20)  # a phone on a bad network, mid-upload
                yield from messages[1:]

            return stub.SubmitUpdate.future(stream())

        uploads = [stalled_upload(*sessions[0]), stalled_upload(*sessions[1])]
        reply = stub.GetTask(device_pb2.GetTaskRequest(session_id=sessions[2][0]), timeout=5)
        assert reply.train.task_id == sessions[2][1].task_id
        release.set()
        assert all(upload.result(timeout=20).accepted for upload in uploads)
    finally:
        release.set()
        channel.close()
        server.stop(0).wait()


def test_the_hand_out_schedule_gives_each_task_a_slot_of_its_own():
    from fedcoreml.server.gateway.service import HandoutSchedule

    clock = [100.0]
    schedule = HandoutSchedule(rate_per_s=10, clock=lambda: clock[0])
    tasks = [board_task(i) for i in range(4)]
    assert [schedule.wait_s(t) for t in tasks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    clock[0] = 100.15
    assert [schedule.wait_s(t) for t in tasks] == pytest.approx([0.0, 0.0, 0.05, 0.15])
    clock[0] = 105.0  # idle for a while: a new task is due at once, not after the old slots
    assert schedule.wait_s(board_task(9)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        HandoutSchedule(rate_per_s=0)


def board_task(node: int):
    return TaskBoard().assign(node, "train", 1, MODEL, CONFIG, 30)


def test_tasks_are_handed_out_at_the_set_rate_each_device_at_its_own_slot():
    from fedcoreml.server.gateway.service import HandoutSchedule

    registry, board = SessionRegistry(idle_ttl_s=30), TaskBoard()
    service = DeviceService(registry, board, parameter_infos(SPEC), 50, long_poll_ms=0,
                            handout=HandoutSchedule(rate_per_s=5))  # fmt: skip
    server, port = start_server(service, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    try:
        sessions = []
        for i in range(4):
            session = stub.Register(device_pb2.RegisterRequest(device_id=f"p{i}")).session_id
            board.assign(registry.touch(session).node_id, "train", 1, MODEL, CONFIG, 30)
            sessions.append(session)
        first = [stub.GetTask(device_pb2.GetTaskRequest(session_id=s)) for s in sessions]
        assert first[0].WhichOneof("task") == "train"
        assert all(reply.WhichOneof("task") == "wait" for reply in first[1:])
        waits = [reply.wait.retry_after_ms for reply in first[1:]]
        # slots 200 ms apart, minus the time the asking itself took
        assert waits == sorted(waits) and waits[-1] <= 600 and waits[-1] - waits[0] >= 200
        assert "5 per second" in first[1].wait.reason
        time.sleep(waits[-1] / 1000)
        again = [stub.GetTask(device_pb2.GetTaskRequest(session_id=s)) for s in sessions]
        assert all(reply.WhichOneof("task") == "train" for reply in again)  # slots kept
    finally:
        channel.close()
        server.stop(0).wait()
