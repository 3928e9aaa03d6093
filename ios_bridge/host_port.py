"""``HOST:PORT`` addresses as the fedcoreml commands take them: parsed, range-checked, resolved.

Accepted forms: ``name:port``, ``1.2.3.4:port`` and ``[v6 address]:port``. The port must lie in
1..65535; where a listening side allows it, 0 asks the system for any free port. Checking here
matters because gRPC folds an out-of-range port silently (99999 becomes 34463) and reports an
unresolvable host only when a connection is tried.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from fedcoreml.ios_bridge.errors import FedCoreMLError

MAX_PORT = 65535


class AddressError(FedCoreMLError):
    """A HOST:PORT that is malformed, out of range or cannot be resolved."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, allow_any_port: bool = False) -> HostPort:
    """Parse ``text``; ``allow_any_port`` admits port 0 (a listener's "any free port")."""
    raw = text.strip()
    if not raw:
        raise AddressError("empty address; expected HOST:PORT")
    if raw.startswith("["):
        host, closed, rest = raw[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise AddressError(f"{raw}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = raw.rpartition(":")
        if not colon:
            raise AddressError(f"{raw}: expected HOST:PORT")
        if ":" in host:
            raise AddressError(f"{raw}: write an IPv6 address in brackets, [IPV6]:PORT")
    if not host:
        raise AddressError(f"{raw}: no host before the port; expected HOST:PORT")
    if not port_text.isascii() or not port_text.isdigit():
        raise AddressError(f"{raw}: the port {port_text!r} is not a whole number")
    port = int(port_text)
    lowest = 0 if allow_any_port else 1
    if not lowest <= port <= MAX_PORT:
        allowed = f"1-{MAX_PORT}" + (", or 0 for any free port" if allow_any_port else "")
        raise AddressError(f"{raw}: port {port} is out of range ({allowed})")
    return HostPort(host, port)


def resolve(address: HostPort, *, passive: bool = False) -> list[tuple]:
    """``socket.getaddrinfo`` for ``address`` (TCP); ``passive`` for an address to listen on."""
    try:
        return socket.getaddrinfo(
            address.host,
            address.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE if passive else 0,
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AddressError(f"{address}: cannot resolve host {address.host!r} ({reason})") from None
