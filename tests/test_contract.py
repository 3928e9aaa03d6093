"""The device contract: protos/README.md and the gateway's refusal table say the same thing, and
what the README promises about echoes, slicing and downloads is what the gateway does."""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
import string
from pathlib import Path

import grpc
import numpy as np
import pytest
from live_gateway import Gateway

from fedcoreml.ios_bridge.channel import bearer_metadata
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.echo import MAX_DETAILS_BYTES, capped, shown
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
from fedcoreml.ios_bridge.tensor_codec import UPDATE_REFUSALS, UpdateHeader, encode_update
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.server.fedbuff import VersionRecord
from fedcoreml.server.gateway import refusals
from fedcoreml.server.gateway.auth import DeviceAuthInterceptor, _bearer_token
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.service import DeviceService
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard, TaskConfig
from fedcoreml.server.gateway.tokens import TokenStore
from fedcoreml.server.run_config import RoundRecord

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "protos" / "README.md").read_text(encoding="utf-8")
STATUS_HEADER = "| key | status | RPCs | message | when, and what to do |"
RPC_HEADER = "| RPC | request | answer | statuses |"
METRICS_HEADER = "| field | type | meaning |"
FEDBUFF_HEADER = "| `fedbuff` field | type | meaning |"

SPEC = build_default_model(seed=0)
SHIPPED = get_parameters(SPEC)
PARAMS = [(n, v + np.float32(0.01)) for n, v in SHIPPED]  # what a device trained
MODEL = RoundModel.from_bytes(0, spec_to_bytes(SPEC))
CONFIG = TaskConfig(epochs=1, batch_size=32, learning_rate=1e-3)
LONG = "x" * 10_000


# -- the README's tables --------------------------------------------------------------------------


def _table(header: str) -> list[list[str]]:
    """The cells of every row of every table in the README that starts with ``header``."""
    rows, inside = [], False
    for line in README.splitlines():
        if line.strip() == header:
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
            continue
        inside = False
    assert rows, f"no table with header {header!r} in protos/README.md"
    return rows


def _code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _documented_refusals() -> dict[str, tuple[str, tuple[str, ...], str]]:
    documented: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for key_cell, status, rpcs, message, _when in _table(STATUS_HEADER):
        key = _code(key_cell)
        assert key not in documented, f"refusal {key} documented twice"
        rpc_names = refusals.RPCS if rpcs == "all" else tuple(_codes(rpcs))
        documented[key] = (_code(status), rpc_names, _code(message))
    return documented


def test_every_refusal_in_the_code_is_documented_and_every_documented_one_exists():
    documented = _documented_refusals()
    in_code = {row.key: (row.status, row.rpcs, row.template) for row in refusals.REFUSALS.values()}
    assert sorted(set(in_code) - set(documented)) == [], "refusals missing from protos/README.md"
    assert sorted(set(documented) - set(in_code)) == [], "documented refusals the code lacks"
    for key, (status, rpcs, template) in in_code.items():
        assert documented[key] == (status, rpcs, template), f"README row {key} differs"


def test_each_rpc_lists_exactly_the_statuses_it_can_return():
    rows = _table(RPC_HEADER)
    assert [_code(row[0]) for row in rows] == list(refusals.RPCS)
    for rpc_cell, _request, _answer, statuses in rows:
        rpc = _code(rpc_cell)
        expected = {row.status for row in refusals.REFUSALS.values() if rpc in row.rpcs}
        listed = _codes(statuses)
        assert len(listed) == len(set(listed)) and set(listed) == expected, rpc


def test_the_metrics_schema_matches_the_round_record():
    types = {
        "int": "integer",
        "float": "number",
        "str": "string",
        "float | None": "number or null",
        "dict[str, Any] | None": "object or absent",
    }
    documented = {_code(field): kind for field, kind, _meaning in _table(METRICS_HEADER)}
    hints = {f.name: str(f.type) for f in dataclasses.fields(RoundRecord)}
    assert list(documented) == list(hints)
    for name, hint in hints.items():
        assert documented[name] == types[hint], name


def test_the_fedbuff_object_is_documented_field_for_field():
    """Every key of an asynchronous version's ``fedbuff`` object, in order, with its type."""
    record = VersionRecord(3, [], accepted=1, handed_out=2)
    documented = [_code(field) for field, _kind, _meaning in _table(FEDBUFF_HEADER)]
    assert documented == list(record.summary())


# -- the table is the only source of refusals ----------------------------------------------------


def _source(module: str) -> str:
    return (ROOT / module).read_text(encoding="utf-8")


def test_the_gateway_raises_only_from_the_table():
    """No module builds a GatewayError or MalformedUpdateError of its own wording."""
    for path in sorted((ROOT / "server" / "gateway").glob("*.py")):
        if path.name in ("errors.py", "refusals.py"):
            continue
        calls = [
            node.func.id
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
        assert "GatewayError" not in calls, path.name
    codec = ast.parse(_source("ios_bridge/tensor_codec.py"))
    builders = {
        function.name
        for function in ast.walk(codec)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "MalformedUpdateError"
    }
    assert builders == {"_malformed"}


def test_every_row_of_the_table_is_raised_somewhere():
    gateway = "".join(
        path.read_text(encoding="utf-8")
        for path in (ROOT / "server" / "gateway").glob("*.py")
        if path.name != "refusals.py"
    )
    for name, row in vars(refusals).items():
        if isinstance(row, refusals.Refusal) and row.source == "gateway":
            assert re.search(rf"\b{name}\b", gateway), f"{name} is never raised"
    raised = {
        node.args[0].value
        for node in ast.walk(ast.parse(_source("ios_bridge/tensor_codec.py")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_malformed"
    }
    assert raised == set(UPDATE_REFUSALS)


def test_templates_are_one_line_and_fill_in():
    for row in refusals.REFUSALS.values():
        fields = [name for _, name, _, _ in string.Formatter().parse(row.template) if name]
        message = row.template.format(**dict.fromkeys(fields, "v"))
        assert message.isprintable() and len(message.encode()) < MAX_DETAILS_BYTES, row.key


# -- echoes ---------------------------------------------------------------------------------------


def test_shown_is_quoted_one_line_and_bounded():
    assert shown("phone-a") == "'phone-a'"
    assert shown("a\nb\x00") == r"'a\nb\x00'"
    assert shown(LONG) == f"'{'x' * 64}…' (10,000 chars)"
    assert shown("\u2028" * 100_000).isprintable() and len(shown("\u2028" * 100_000)) < 500


def test_capped_keeps_messages_under_the_metadata_budget():
    assert capped("fine") == "fine"
    cut = capped("é" * 5_000)
    assert len(cut.encode()) <= MAX_DETAILS_BYTES and cut.endswith("… (10,000 bytes)")
    assert capped("two\nlines") == r"two\nlines"


class _Context:
    """Enough of a grpc.ServicerContext to see what ``abort`` is given."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.RpcError()


def test_every_status_message_is_capped_where_statuses_are_raised(caplog):
    service = DeviceService(SessionRegistry(), TaskBoard(), parameter_infos(SPEC))
    context = _Context()

    def body():
        raise GatewayError("line one\nline two " + "é" * 10_000, "INVALID_ARGUMENT", "test")

    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    with pytest.raises(grpc.RpcError):
        service._guarded(context, "Register", body)
    code, details = context.aborted
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details.encode()) <= MAX_DETAILS_BYTES and "\n" not in details
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and len(record.getMessage()) < 1200


# -- a live gateway -------------------------------------------------------------------------------


@pytest.fixture
def gw():
    gateway = Gateway(long_poll_ms=0, client_send_limit=64 << 20)
    yield gateway
    gateway.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):  # a response stream fails when read
            list(result)
    return err.value.code(), err.value.details()


def _gateway_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedcoreml.gateway"]


def _assert_bounded(details: str, caplog) -> None:
    assert len(details.encode()) <= MAX_DETAILS_BYTES and "\n" not in details
    assert "(10,000 chars)" in details
    lines = _gateway_lines(caplog)
    assert lines and all("\n" not in line and len(line) < 1200 for line in lines)


def test_a_huge_device_id_comes_back_bounded_in_the_status_and_the_log(gw, caplog):
    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    evil = ("x\nFORGED LOG LINE " * 1_000)[:10_000]
    code, details = status_of(lambda: gw.stub.Register(device_pb2.RegisterRequest(device_id=evil)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("device_id must be 1-128 characters")
    _assert_bounded(details, caplog)


def test_platform_and_versions_are_logged_bounded(gw, caplog):
    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    gw.stub.Register(
        device_pb2.RegisterRequest(
            device_id="phone-a", platform="iOS\n" * 2_500, os_version=LONG, app_version=LONG
        )
    )
    (line,) = [line for line in _gateway_lines(caplog) if "registered" in line]
    assert "\n" not in line and len(line) < 600 and line.count("(10,000 chars)") == 3


def test_a_huge_tensor_name_comes_back_bounded(gw, caplog):
    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    session, node = gw.register("phone-a")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    params = [(LONG if n == "conv2.bias" else n, v) for n, v in PARAMS]
    header = UpdateHeader(session, task.task_id, 10, 0.1, 0.5, 1.0)
    code, details = status_of(lambda: gw.stub.SubmitUpdate(encode_update(header, params)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("unknown tensor 'xxx")
    _assert_bounded(details, caplog)


def test_a_huge_task_id_comes_back_bounded(gw, caplog):
    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    session, _ = gw.register("phone-a")
    request = device_pb2.SubmitEvaluationRequest(
        session_id=session, task_id=LONG, num_examples=1, loss=0.1, accuracy=0.5
    )
    code, details = status_of(lambda: gw.stub.SubmitEvaluation(request))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("unknown task id 'xxx")
    _assert_bounded(details, caplog)


def test_register_as_another_device_with_a_huge_id_is_bounded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedcoreml.gateway")
    secret = TokenStore(tmp_path).create("phone-a")
    gateway = Gateway(
        [DeviceAuthInterceptor(TokenStore(tmp_path))], long_poll_ms=0, client_send_limit=64 << 20
    )
    try:
        code, details = status_of(lambda: gateway.register(LONG, metadata=bearer_metadata(secret)))
    finally:
        gateway.close()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("this token was issued for device 'phone-a'; it cannot register")
    _assert_bounded(details, caplog)


# -- slicing rules ------------------------------------------------------------------------------


def _update(gw) -> tuple[list[device_pb2.UpdateChunk], str]:
    session, node = gw.register("phone-a")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    header = UpdateHeader(session, task.task_id, 10, 0.1, 0.5, 1.0)
    return list(encode_update(header, PARAMS, chunk_bytes=1024 * 1024)), task.task_id


def _hidden1(messages) -> list[int]:
    return [i for i, m in enumerate(messages) if m.tensor.name == "hidden1.weights"]


def test_a_slice_off_a_four_byte_boundary_is_refused(gw):
    messages, task_id = _update(gw)
    messages[_hidden1(messages)[1]].tensor.offset += 2
    code, details = status_of(lambda: gw.stub.SubmitUpdate(iter(messages)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "tensor 'hidden1.weights': a slice of 1048576 bytes at byte 1048578; slices must start "
        "on a 4-byte boundary and hold whole float32 values"
    )
    bias = next(m for m in messages if m.tensor.name == "hidden2.bias")
    bias.tensor.data = bias.tensor.data[:-1]
    messages[_hidden1(messages)[1]].tensor.offset -= 2
    code, details = status_of(lambda: gw.stub.SubmitUpdate(iter(messages)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "a slice of 39 bytes at byte 0" in details
    assert gw.board._tasks[task_id].status == "pending"  # still open for a correct update


def test_interleaved_tensors_get_their_own_message(gw):
    messages, _ = _update(gw)
    bias = next(i for i, m in enumerate(messages) if m.tensor.name == "hidden1.bias")
    messages.insert(_hidden1(messages)[1], messages.pop(bias))
    code, details = status_of(lambda: gw.stub.SubmitUpdate(iter(messages)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "tensor 'hidden1.weights' interleaved with 'hidden1.bias': send all slices of one tensor "
        "before the next"
    )


# -- DownloadModel edges ------------------------------------------------------------------------


def _download(gw, session: str, task_id: str, offset: int = 0) -> list[device_pb2.ModelChunk]:
    request = device_pb2.DownloadModelRequest(session_id=session, task_id=task_id, offset=offset)
    return list(gw.stub.DownloadModel(request))


def test_a_download_at_the_end_is_one_empty_chunk_that_confirms_the_model(gw):
    session, node = gw.register("phone-a")
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    (chunk,) = _download(gw, session, task.task_id, offset=len(MODEL.data))
    assert chunk.data == b"" and chunk.offset == chunk.total_size == len(MODEL.data)
    assert chunk.sha256 == MODEL.sha256
    code, details = status_of(lambda: _download(gw, session, task.task_id, len(MODEL.data) + 1))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    size = len(MODEL.data)
    assert details == f"offset {size + 1} is past the end of the model ({size} bytes)"


def test_a_closed_or_submitted_task_cannot_be_downloaded(gw):
    session, node = gw.register("phone-a")
    closed = gw.board.assign(node, "train", 3, MODEL, CONFIG, 30)
    gw.board.close([closed.task_id], "round closed")
    expected = f"task '{closed.task_id}' of round 3 is closed (round closed)"
    for _ in range(2):  # on the board, then after the coordinator took it
        code, details = status_of(lambda: _download(gw, session, closed.task_id))
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, expected)
        gw.board.take([closed.task_id])
    done = gw.board.assign(node, "train", 4, MODEL, CONFIG, 30)
    header = UpdateHeader(session, done.task_id, 10, 0.1, 0.5, 1.0)
    assert gw.stub.SubmitUpdate(encode_update(header, PARAMS)).accepted
    expected = f"task '{done.task_id}' of round 4 was already submitted"
    for _ in range(2):
        code, details = status_of(lambda: _download(gw, session, done.task_id))
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, expected)
        gw.board.take([done.task_id])


# -- gRPC's own refusals ------------------------------------------------------------------------


def _matches(row: refusals.Refusal, details: str) -> bool:
    pattern = re.sub(r"\\\{\w+\\\}", ".+", re.escape(row.template))
    return re.search(pattern, details) is not None


def test_grpcs_own_refusals_read_as_documented(gw):
    code, details = status_of(
        lambda: gw.stub.Register(device_pb2.RegisterRequest(device_id="x" * (5 << 20)))
    )
    assert code.name == refusals.MESSAGE_TOO_LARGE.status
    assert _matches(refusals.MESSAGE_TOO_LARGE, details), details
    raw = gw.channel.unary_unary("/fedcoreml.v1.DeviceService/Register")
    code, details = status_of(lambda: raw(b"\xff\xff\xff"))
    assert code.name == refusals.UNPARSEABLE_MESSAGE.status
    assert _matches(refusals.UNPARSEABLE_MESSAGE, details), details


# -- the authorization header -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer fcm_a"),), "fcm_a"),
        ((("authorization", "  bearer   fcm_a  "),), "fcm_a"),
        ((("Authorization", "BEARER fcm_a"),), "fcm_a"),
        ((("authorization", "Basic abc"), ("authorization", "Bearer fcm_b")), "fcm_b"),
        ((("authorization", "Bearer fcm_a"), ("authorization", "Bearer fcm_b")), "fcm_a"),
        ((("authorization", "Bearer "),), None),
        ((("authorization", "Bearer\tfcm_a"),), None),
        ((("authorization", "fcm_a"),), None),
        ((("x-token", "Bearer fcm_a"),), None),
        ((), None),
    ],
)
def test_the_documented_authorization_forms_are_the_accepted_ones(metadata, token):
    assert _bearer_token(metadata) == token
