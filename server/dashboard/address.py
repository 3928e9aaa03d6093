"""Where the dashboard listens, and whether that is loopback only.

``--dashboard HOST:PORT`` takes the forms ``--listen`` takes (port 0: any free port). An address
whose every resolution is a loopback address (``127.0.0.1``, ``localhost``, ``[::1]``) is
reachable from this machine only, and needs no token; anything else (``0.0.0.0``, a LAN
address, a name that resolves beyond loopback) is served only with a dashboard token.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from fedcoreml.ios_bridge.host_port import AddressError, parse_host_port, resolve

__all__ = ["LOOPBACK_NAMES", "DashboardAddress", "parse_dashboard_address"]

#: Host names a browser on this machine uses for a loopback dashboard (checked against the
#: request's Host header, so that a page from elsewhere cannot reach it by DNS rebinding).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class DashboardAddress:
    """A parsed, resolved ``--dashboard`` address: what to bind, and whether it is loopback."""

    text: str
    host: str
    port: int
    family: socket.AddressFamily
    sockaddr: tuple
    loopback: bool
    wildcard: bool  # 0.0.0.0 or [::]: every interface of this machine


def parse_dashboard_address(text: str) -> DashboardAddress:
    """Parse and resolve ``text``; raises AddressError (naming ``--dashboard``) if it cannot be."""
    try:
        address = parse_host_port(text, allow_any_port=True)
        infos = resolve(address, passive=True)
    except AddressError as exc:
        raise AddressError(f"--dashboard {exc}") from None
    if not infos:
        raise AddressError(f"--dashboard {text}: the host resolves to no address")
    ips = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    # Bind the first IPv4 resolution if there is one (what a browser tries first for "localhost").
    family, _, _, _, sockaddr = next(
        (info for info in infos if info[0] == socket.AF_INET), infos[0]
    )
    return DashboardAddress(
        text=text,
        host=address.host,
        port=address.port,
        family=family,
        sockaddr=sockaddr,
        loopback=all(ip.is_loopback for ip in ips),
        wildcard=any(ip.is_unspecified for ip in ips),
    )
