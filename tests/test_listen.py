"""HOST:PORT parsing and the coordinator's device port: refused clearly, never shared."""

from __future__ import annotations

import errno
import re
import socket

import pytest

from fedcoreml.ios_bridge.host_port import AddressError, HostPort, parse_host_port, resolve
from fedcoreml.ios_bridge.wire.device_pb2_grpc import DeviceServiceServicer
from fedcoreml.server.gateway.listen import ListenError, check_listen_address
from fedcoreml.server.gateway.service import start_server


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", HostPort("127.0.0.1", 50051)),
        (" localhost:1 ", HostPort("localhost", 1)),
        ("[::1]:65535", HostPort("::1", 65535)),
        ("coordinator.example:443", HostPort("coordinator.example", 443)),
    ],
)
def test_addresses_parse(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (1-65535)"),
        ("127.0.0.1:0", "port 0 is out of range (1-65535)"),
        ("127.0.0.1", "expected HOST:PORT"),
        (":50051", "no host before the port"),
        ("host:http", "the port 'http' is not a whole number"),
        ("host:-1", "the port '-1' is not a whole number"),
        ("::1:50051", "write an IPv6 address in brackets"),
        ("[::1]50051", "expected [IPV6]:PORT"),
        ("", "empty address"),
    ],
)
def test_bad_addresses_are_refused_in_one_line(text, reason):
    with pytest.raises(AddressError) as refused:
        parse_host_port(text)
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_port_zero_only_where_any_port_will_do():
    assert parse_host_port("127.0.0.1:0", allow_any_port=True).port == 0
    with pytest.raises(AddressError, match=r"or 0 for any free port"):
        parse_host_port("127.0.0.1:70000", allow_any_port=True)


def test_an_unresolvable_host_is_named():
    with pytest.raises(AddressError, match=re.escape("cannot resolve host 'nohost.invalid'")):
        resolve(HostPort("nohost.invalid", 50051))


@pytest.fixture
def listener():
    server, port = start_server(DeviceServiceServicer(), "127.0.0.1:0")
    yield port
    server.stop(0).wait()


def test_a_port_in_use_is_refused_by_name(listener):
    with pytest.raises(ListenError) as refused:
        start_server(DeviceServiceServicer(), f"127.0.0.1:{listener}")
    assert str(refused.value) == (
        f"cannot listen on 127.0.0.1:{listener}: port {listener} is already in use "
        "(another coordinator?)"
    )


def test_the_device_port_is_never_shared(listener):
    """gRPC turns SO_REUSEPORT on by default; then this socket would take half the devices."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as intruder:
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as refused:
                intruder.bind((host, listener))
            assert refused.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (1-65535, or 0 for any free port)"),
        ("nohost.invalid:50051", "cannot resolve host 'nohost.invalid'"),
        ("192.0.2.1:50051", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1
    ],
)
def test_start_server_refuses_before_grpc_binds(address, reason):
    with pytest.raises(ListenError, match=re.escape(reason)):
        start_server(DeviceServiceServicer(), address)


def test_a_free_port_passes_the_check():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert check_listen_address(f"127.0.0.1:{port}") == HostPort("127.0.0.1", port)
