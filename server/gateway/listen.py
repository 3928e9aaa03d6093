"""The device port: check that the coordinator can listen on HOST:PORT before gRPC tries.

gRPC says only "Failed to bind to address" (with the reason in C++ log lines on stderr). Binding
a plain socket to each resolved address first turns the reason into one sentence: the port is in
use, the address is not this machine's, or a privileged port. The listener itself never shares
its port (``SO_REUSEPORT`` off, see ``service.start_server``), so a second coordinator on the
same port is refused rather than silently handed half of the connections.
"""

from __future__ import annotations

import errno
import socket

from fedcoreml.ios_bridge.host_port import AddressError, HostPort, parse_host_port, resolve


class ListenError(AddressError):
    """The coordinator cannot listen on the address it was given."""


def check_listen_address(text: str) -> HostPort:
    """Parse, resolve and test-bind ``text``; raises :class:`ListenError` saying why not."""
    try:
        address = parse_host_port(text, allow_any_port=True)
        infos = resolve(address, passive=True)
    except AddressError as exc:
        raise ListenError(str(exc)) from None
    if address.port == 0:
        return address  # the system picks a free port: nothing can conflict
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC's listener does: a connection of a previous process in TIME_WAIT does
            # not hold the port, a listening socket does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(_reason(address, exc)) from None
                failures.append(exc)
    if infos and len(failures) == len(infos):  # gRPC listens if any one address binds
        raise ListenError(_reason(address, failures[0]))
    return address


def _reason(address: HostPort, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        why = f"port {address.port} is already in use (another coordinator?)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{address.host} is not an address of this machine"
    elif exc.errno == errno.EACCES:
        why = f"permission denied (port {address.port} needs privileges)"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen on {address}: {why}"
