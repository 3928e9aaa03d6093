"""Transport security and device identity: TLS, per-device bearer tokens, rate limits.

A real gateway (``DeviceService`` behind ``DeviceAuthInterceptor``) serves TLS with a generated
test CA on 127.0.0.1; the protocol is driven with the generated stub, and simulated devices run
against it with ``--ca-cert``/``--token-file``.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcoreml.ios_bridge.channel import (
    RETRY_AFTER_KEY,
    TLSConfigError,
    bearer_metadata,
    channel_credentials,
)
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
from fedcoreml.ios_bridge.tensor_codec import UpdateHeader, encode_update
from fedcoreml.ios_bridge.token_file import TokenFileError, read_token_file, write_token_file
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc
from fedcoreml.server.gateway.auth import (
    DeviceAuthInterceptor,
    RateLimiter,
    authenticated_device_id,
)
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.service import DeviceService, start_server
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard, TaskConfig
from fedcoreml.server.gateway.tls import (
    CertificatePaths,
    generate_test_ca,
    server_credentials,
)
from fedcoreml.server.gateway.tokens import (
    TokenError,
    TokenStore,
)

SPEC = build_default_model(seed=0)
PARAMS = [(n, v + np.float32(0.01)) for n, v in get_parameters(SPEC)]  # trained
MODEL = RoundModel.from_bytes(0, spec_to_bytes(SPEC))
CONFIG = TaskConfig(epochs=1, batch_size=32, learning_rate=1e-3)
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificatePaths:
    return generate_test_ca(tmp_path_factory.mktemp("tls"))


@dataclass
class SecureGateway:
    """A TLS gateway with auth; ``tokens`` holds one issued token per device."""

    run_dir: Path
    store: TokenStore
    registry: SessionRegistry
    board: TaskBoard
    server: grpc.Server
    address: str
    channel: grpc.Channel
    stub: device_pb2_grpc.DeviceServiceStub
    tokens: dict[str, str]
    ca_cert: Path

    def register(self, device_id: str, token: str | None = None) -> tuple[str, int]:
        token = token if token is not None else self.tokens[device_id]
        request = device_pb2.RegisterRequest(device_id=device_id)
        session = self.stub.Register(request, metadata=bearer_metadata(token)).session_id
        return session, self.registry.touch(session).node_id


def open_gateway(
    run_dir: Path, certs: CertificatePaths, limiter: RateLimiter | None = None
) -> SecureGateway:
    store = TokenStore(run_dir)
    tokens = {device: store.create(device) for device in ("phone-a", "phone-b")}
    registry, board = SessionRegistry(idle_ttl_s=30), TaskBoard()
    service = DeviceService(registry, board, parameter_infos(SPEC), 20, long_poll_ms=0)
    interceptor = DeviceAuthInterceptor(store, limiter or RateLimiter(1000, 1000))
    credentials = server_credentials(certs.server_cert, certs.server_key)
    server, port = start_server(
        service, "127.0.0.1:0", credentials=credentials, interceptors=[interceptor]
    )
    address = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(address, channel_credentials(certs.ca_cert))
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    return SecureGateway(
        run_dir, store, registry, board, server, address, channel, stub, tokens, certs.ca_cert
    )


@pytest.fixture
def gw(tmp_path, certs) -> Iterator[SecureGateway]:
    gateway = open_gateway(tmp_path, certs)
    yield gateway
    gateway.channel.close()
    gateway.server.stop(0).wait()


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def rpcs(stub, session: str = "s", task_id: str = "t", metadata=None) -> dict[str, Callable]:
    """Every DeviceService RPC, ready to call with ``metadata``."""
    header = UpdateHeader(session, task_id, 100, 0.5, 0.5, 1.0)
    opts = {"metadata": metadata, "timeout": TIMEOUT}
    return {
        "Register": lambda: stub.Register(device_pb2.RegisterRequest(device_id="phone-a"), **opts),
        "GetTask": lambda: stub.GetTask(device_pb2.GetTaskRequest(session_id=session), **opts),
        "DownloadModel": lambda: list(
            stub.DownloadModel(
                device_pb2.DownloadModelRequest(session_id=session, task_id=task_id), **opts
            )
        ),
        "SubmitUpdate": lambda: stub.SubmitUpdate(encode_update(header, PARAMS), **opts),
        "SubmitEvaluation": lambda: stub.SubmitEvaluation(
            device_pb2.SubmitEvaluationRequest(
                session_id=session, task_id=task_id, num_examples=10, loss=0.5, accuracy=0.5
            ),
            **opts,
        ),
    }


RPC_NAMES = ["Register", "GetTask", "DownloadModel", "SubmitUpdate", "SubmitEvaluation"]


# -- the token store ----------------------------------------------------------------------------


def test_tokens_are_stored_as_hashes_only(tmp_path):
    store = TokenStore(tmp_path)
    secret = store.create("phone-a")
    assert secret.startswith("fcm_") and len(secret) > 40
    text = (tmp_path / "tokens.json").read_text()
    assert secret not in text and secret[12:] not in text and secret[12:24] not in text
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert store.verify(secret) == "phone-a"
    [info] = store.list()
    assert info.device_id == "phone-a" and not info.revoked and info.created.endswith("Z")
    assert info.prefix == secret[:12] and secret not in repr(info)


@pytest.mark.parametrize("secret", [None, "", "fcm_not-a-token"])
def test_verify_refuses_missing_and_unknown_tokens(tmp_path, secret):
    store = TokenStore(tmp_path)
    store.create("phone-a")
    with pytest.raises(GatewayError) as err:
        store.verify(secret)
    assert err.value.code == "UNAUTHENTICATED"
    assert str(err.value) == ("missing bearer token" if not secret else "unknown or revoked token")


def test_a_revocation_by_another_process_is_seen_at_once(tmp_path):
    server_side, cli_side = TokenStore(tmp_path), TokenStore(tmp_path)
    secret = server_side.create("phone-a")
    other = server_side.create("phone-b")
    assert cli_side.verify(secret) == "phone-a"  # saw the other instance's create
    [revoked] = cli_side.revoke("phone-a")
    assert revoked.revoked and revoked.revoked_at
    with pytest.raises(GatewayError, match="unknown or revoked"):
        server_side.verify(secret)
    assert server_side.verify(other) == "phone-b"
    assert cli_side.revoke("phone-a") == []  # already revoked


def test_revoke_by_prefix_or_whole_token(tmp_path):
    store = TokenStore(tmp_path)
    first, second = store.create("phone-a"), store.create("phone-a")  # rotation: two tokens
    [revoked] = store.revoke(first[:12])
    assert revoked.prefix == first[:12]
    assert store.verify(second) == "phone-a"
    store.revoke(second)
    assert all(info.revoked for info in store.list())
    with pytest.raises(TokenError, match="no device or token matches"):
        store.revoke("phone-z")
    with pytest.raises(TokenError, match="device id"):
        store.create("")


def test_an_unreadable_store_lets_nobody_in(tmp_path):
    store = TokenStore(tmp_path)
    secret = store.create("phone-a")
    (tmp_path / "tokens.json").write_text("{ broken")
    with pytest.raises(GatewayError) as err:
        store.verify(secret)
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(TokenError, match="not a readable token store"):
        TokenStore(tmp_path)


def test_token_files_round_trip_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "devices.json"
    write_token_file(path, {"sim-000": "fcm_a"})
    write_token_file(path, {"sim-001": "fcm_b"})  # added to the file
    assert read_token_file(path) == {"sim-000": "fcm_a", "sim-001": "fcm_b"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text('["fcm_a"]')
    with pytest.raises(TokenFileError, match=r"devices\.json"):
        read_token_file(path)
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "missing.json")


def test_the_rate_limiter_allows_a_burst_then_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # buckets are per device
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        RateLimiter(0, 1)


# -- TLS -------------------------------------------------------------------------------------


def test_tls_helpers_name_the_bad_file(tmp_path, certs):
    with pytest.raises(TLSConfigError, match=r"missing\.pem: no such file"):
        server_credentials(tmp_path / "missing.pem", certs.server_key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"junk\.pem: not PEM"):
        channel_credentials(junk)
    with pytest.raises(TLSConfigError, match=r"junk\.pem: not PEM"):
        server_credentials(certs.server_cert, junk)
    with pytest.raises(TLSConfigError, match="does not belong to the certificate"):
        server_credentials(certs.server_cert, certs.ca_key)
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600


def test_a_plaintext_client_cannot_talk_to_the_tls_port(gw):
    with grpc.insecure_channel(gw.address) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        err = status_of(
            lambda: stub.Register(
                device_pb2.RegisterRequest(device_id="phone-a"),
                metadata=bearer_metadata(gw.tokens["phone-a"]),
                timeout=5,
            )
        )
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_client_that_does_not_trust_the_ca_fails(gw, tmp_path):
    stranger = generate_test_ca(tmp_path / "other-ca")
    credentials = channel_credentials(stranger.ca_cert)
    with grpc.secure_channel(gw.address, credentials) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        err = status_of(lambda: rpcs(stub, metadata=bearer_metadata(gw.tokens["phone-a"]))[
            "Register"
        ]())  # fmt: skip
    assert err.code() == grpc.StatusCode.UNAVAILABLE


# -- authentication over gRPC -----------------------------------------------------------------


def test_a_valid_token_over_tls_runs_the_whole_protocol(gw):
    session, node = gw.register("phone-a")
    auth = bearer_metadata(gw.tokens["phone-a"])
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session), metadata=auth)
    assert reply.WhichOneof("task") == "wait"
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session), metadata=auth)
    assert reply.train.task_id == task.task_id
    request = device_pb2.DownloadModelRequest(session_id=session, task_id=task.task_id)
    chunks = list(gw.stub.DownloadModel(request, metadata=auth))
    assert b"".join(chunk.data for chunk in chunks) == MODEL.data
    header = UpdateHeader(session, task.task_id, 100, 0.5, 0.5, 1.0)
    assert gw.stub.SubmitUpdate(encode_update(header, PARAMS), metadata=auth).accepted
    evaluation = gw.board.assign(node, "evaluate", 1, MODEL, None, 30)
    reply = gw.stub.SubmitEvaluation(
        device_pb2.SubmitEvaluationRequest(
            session_id=session, task_id=evaluation.task_id, num_examples=10, loss=0.4, accuracy=0.6
        ),
        metadata=auth,
    )
    assert reply.accepted
    assert [t.status for t in gw.board.take([task.task_id, evaluation.task_id])] == [
        "submitted",
        "submitted",
    ]


@pytest.mark.parametrize("rpc", RPC_NAMES)
def test_every_rpc_needs_a_known_token(gw, rpc):
    session, _ = gw.register("phone-a")
    err = status_of(rpcs(gw.stub, session)[rpc])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "missing bearer token"
    for metadata in (bearer_metadata("fcm_forged"), (("authorization", "Basic abc"),)):
        err = status_of(rpcs(gw.stub, session, metadata=metadata)[rpc])
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        "unknown or revoked token"
        in status_of(rpcs(gw.stub, session, metadata=bearer_metadata("fcm_forged"))[rpc]).details()
    )


@pytest.mark.parametrize("rpc", RPC_NAMES)
def test_a_token_revoked_by_another_process_is_refused(gw, rpc):
    session, _ = gw.register("phone-a")
    TokenStore(gw.run_dir).revoke("phone-a")  # as `fedcoreml tokens revoke` would
    err = status_of(rpcs(gw.stub, session, metadata=bearer_metadata(gw.tokens["phone-a"]))[rpc])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "unknown or revoked token"
    gw.register("phone-b")  # other devices go on


def test_a_token_cannot_register_as_another_device(gw):
    err = status_of(lambda: gw.register("phone-b", token=gw.tokens["phone-a"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'phone-a'" in err.details() and "'phone-b'" in err.details()


@pytest.mark.parametrize("rpc", ["GetTask", "DownloadModel", "SubmitUpdate", "SubmitEvaluation"])
def test_a_token_cannot_use_another_devices_session(gw, rpc):
    session_b, node_b = gw.register("phone-b")
    task = gw.board.assign(node_b, "train", 1, MODEL, CONFIG, 30)
    as_a = bearer_metadata(gw.tokens["phone-a"])
    err = status_of(rpcs(gw.stub, session_b, task.task_id, metadata=as_a)[rpc])
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to another device" in err.details()
    assert gw.board.take([task.task_id]) == []  # still pending: untouched


def test_over_the_rate_a_device_is_told_when_to_retry(tmp_path, certs):
    gateway = open_gateway(tmp_path, certs, RateLimiter(rate_per_s=0.5, burst=2))
    try:
        session, _ = gateway.register("phone-a")  # 1 of 2
        auth = bearer_metadata(gateway.tokens["phone-a"])
        gateway.stub.GetTask(device_pb2.GetTaskRequest(session_id=session), metadata=auth)
        err = status_of(rpcs(gateway.stub, session, metadata=auth)["GetTask"])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry_ms = dict(err.trailing_metadata())[RETRY_AFTER_KEY]
        assert 1000 < int(retry_ms) <= 2000
        assert f"retry after {retry_ms} ms" in err.details()
        gateway.register("phone-b")  # its own bucket
    finally:
        gateway.channel.close()
        gateway.server.stop(0).wait()


def test_without_the_interceptor_there_is_no_caller():
    assert authenticated_device_id() is None


# -- fedcoreml tokens --------------------------------------------------------------------------


def fedcoreml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedcoreml.server.cli", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_tokens_command_creates_lists_and_revokes(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "devices.json"
    created = fedcoreml(
        "tokens", "create", "--run-dir", str(run_dir), "--count", "2", "--device", "phone-x",
        "--out", str(out),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secrets = read_token_file(out)
    assert sorted(secrets) == ["phone-x", "sim-000", "sim-001"]
    for device, secret in secrets.items():
        assert f"{device}  {secret}" in created.stdout
        assert TokenStore(run_dir).verify(secret) == device
    listed = fedcoreml("tokens", "list", "--run-dir", str(run_dir))
    assert listed.returncode == 0 and listed.stdout.count("active") == 3
    assert not any(secret in listed.stdout for secret in secrets.values())
    revoked = fedcoreml("tokens", "revoke", "--run-dir", str(run_dir), "--device", "sim-001")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    listed = fedcoreml("tokens", "list", "--run-dir", str(run_dir))
    assert listed.stdout.count("active") == 2 and "revoked 20" in listed.stdout
    stored = (run_dir / "tokens.json").read_text()
    assert not any(secret in stored for secret in secrets.values())
    unknown = fedcoreml("tokens", "revoke", "--run-dir", str(run_dir), "--device", "nope")
    assert unknown.returncode == 2 and "no device or token matches 'nope'" in unknown.stderr


# -- simulated devices with --ca-cert / --token-file ------------------------------------------


def tiny_data():
    from fedcoreml.client_sim.device import DeviceData

    x = np.zeros((2, 1, 28, 28), np.float32)
    return DeviceData(x, np.zeros(2, np.int64), x, np.zeros(2, np.int64))


def fast_retry():
    from fedcoreml.client_sim.device import RetryPolicy

    return RetryPolicy(initial_backoff=0.01, max_backoff=0.5, give_up_after=5.0, rpc_timeout=10.0)


def run_device(gw: SecureGateway, token: str, device_id: str = "phone-a"):
    from fedcoreml.client_sim.device import SimulatedDevice
    from fedcoreml.ios_bridge.channel import open_channel

    with open_channel(gw.address, gw.ca_cert) as channel:
        device = SimulatedDevice(channel, device_id, tiny_data(), retry=fast_retry(), token=token)
        return device.run()


def test_a_device_sends_its_token_over_tls(gw):
    gw.board.finish_run(MODEL)
    stats = run_device(gw, gw.tokens["phone-a"])
    assert stats.finished and stats.registrations == 1 and stats.retries == 0


def test_a_refused_token_ends_the_device_at_once(gw):
    from fedcoreml.ios_bridge.device_client import UnauthenticatedError

    with pytest.raises(UnauthenticatedError, match=r"Register refused \(UNAUTHENTICATED\)") as err:
        run_device(gw, "fcm_forged")
    assert "unknown or revoked token" in str(err.value)


def test_a_throttled_device_waits_as_told_and_goes_on(tmp_path, certs):
    gateway = open_gateway(tmp_path, certs, RateLimiter(rate_per_s=4, burst=1))
    try:
        gateway.board.finish_run(MODEL)
        stats = run_device(gateway, gateway.tokens["phone-a"])
    finally:
        gateway.channel.close()
        gateway.server.stop(0).wait()
    assert stats.finished and stats.throttled >= 1 and stats.retries == 0


def test_a_fleet_needs_a_token_for_every_device(gw):
    from fedcoreml.client_sim.fleet import FleetError, FleetOptions, run_fleet

    options = FleetOptions(ca_cert=gw.ca_cert, tokens={"sim-000": "fcm_x"})
    with pytest.raises(FleetError, match="no token for device"):
        run_fleet(gw.address, [tiny_data(), tiny_data()], options)


def test_the_devices_command_reads_ca_cert_and_token_file(gw, tmp_path, capsys):
    from fedcoreml.server.cli import main

    gw.board.finish_run(MODEL)
    token_file = write_token_file(
        tmp_path / "devices.json", {f"sim-00{i}": gw.store.create(f"sim-00{i}") for i in range(2)}
    )
    code = main([
        "devices", "--server", gw.address, "--count", "2", "--give-up-after", "5",
        "--ca-cert", str(gw.ca_cert), "--token-file", str(token_file),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured
    assert captured.out.count("finished") == 2 and "without TLS" not in captured.err


def test_the_devices_command_warns_without_tls(capsys):
    from fedcoreml.server.cli import main

    board = TaskBoard()
    board.finish_run(MODEL)
    service = DeviceService(SessionRegistry(), board, parameter_infos(SPEC), long_poll_ms=0)
    server, port = start_server(service, "127.0.0.1:0")
    try:
        code = main(["devices", "--server", f"127.0.0.1:{port}", "--count", "1"])
    finally:
        server.stop(0).wait()
    captured = capsys.readouterr()
    assert code == 0 and "finished" in captured.out
    assert "warning: connecting to" in captured.err and "without TLS" in captured.err


def test_other_services_pass_through_unauthenticated(tmp_path):
    """Health checks and the like (no token to send) are not the interceptor's business."""

    @dataclass
    class Details:
        method: str
        invocation_metadata: tuple = ()

    health = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    interceptor = DeviceAuthInterceptor(TokenStore(tmp_path))
    details = Details("/grpc.health.v1.Health/Check")
    assert interceptor.intercept_service(lambda _: health, details) is health
    assert interceptor.intercept_service(lambda _: None, details) is None
