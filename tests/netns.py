"""Network namespaces with impaired links, for tests: a device behind its own mobile link.

``TestNetwork`` (a context manager) makes a bridge on the host with a private /24 address (the
coordinator listens there) and, per :meth:`TestNetwork.add`, a namespace joined to the bridge by
a veth pair whose two directions (downloads: host side egress; uploads: namespace side egress)
carry an :class:`Impairment`. What the kernel offers decides how:

- ``netem`` (delay, loss and rate in one qdisc on each end) whenever the kernel has it;
- otherwise rate by an HTB class, loss by a classic-BPF classifier drawing ``prandom`` that sends
  the chosen share of packets to a class whose queue holds nothing (``pfifo limit 0``), and delay
  by a user-space frame relay spliced into the link (tests/frame_relay.py).

Each namespace's :attr:`Link.applied` says how every impairment was applied and
:attr:`Link.missing` why one could not be (the exact error), so a test can skip what it
cannot have instead of passing without it. Names carry a random tag (parallel runs never
collide), the /24 is one no interface or route of the host uses, and everything made is removed
on exit, also after a failure. Links are cut and restored with :meth:`Link.cut` and
:meth:`Link.restore`. Needs root (CAP_NET_ADMIN): see :func:`unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from frame_relay import FrameRelay

CAP_NET_ADMIN = 12
HTB_UNLIMITED = "10gbit"  # the rate of an HTB class that only exists to carry the loss filter
# Classic BPF: A = prandom_u32 (SKF_AD_OFF + SKF_AD_RANDOM); A > threshold: no match (0), else
# match (-1: the filter's classid, the dropping class).
BPF_LOSS = "4,32 0 0 4294963256,37 1 0 {threshold},6 0 0 4294967295,6 0 0 0"


class NetnsError(RuntimeError):
    """A command that builds or changes the test network failed: names the command."""


@dataclass(frozen=True)
class Impairment:
    """What a link does to traffic, the same in each direction (like netem on both ends)."""

    delay_ms: float = 0.0  # added one way
    loss: float = 0.0  # share of packets dropped, 0..1
    rate_mbit: float = 0.0  # 0: not limited

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.rate_mbit < 0 or not 0 <= self.loss < 1:
            raise ValueError(f"impossible impairment {self!r}")

    @property
    def kinds(self) -> list[str]:
        """The impairments wanted: ``delay``, ``loss``, ``rate``."""
        return [k for k, v in (("delay", self.delay_ms), ("loss", self.loss),
                               ("rate", self.rate_mbit)) if v]  # fmt: skip

    def __str__(self) -> str:
        parts = [f"{self.delay_ms:g} ms delay each way"] if self.delay_ms else []
        parts += [f"{self.loss:.0%} loss each way"] if self.loss else []
        parts += [f"{self.rate_mbit:g} Mbit/s each way"] if self.rate_mbit else []
        return ", ".join(parts) or "no impairment"


@dataclass
class Link:
    """One namespace and its link to the host's bridge."""

    label: str
    namespace: str
    address: str  # the namespace's own address
    device_if: str  # its end of the link, inside the namespace
    host_if: str  # the bridge port: its egress is what the device downloads
    impairment: Impairment
    applied: dict[str, str] = field(default_factory=dict)  # kind -> how
    missing: dict[str, str] = field(default_factory=dict)  # kind -> why not
    relay: FrameRelay | None = None

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def bytes_to_device(self) -> int:
        """Bytes the host has sent into this link so far (the bridge port's tx counter)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())

    def cut(self, peer: str) -> None:
        """The device loses its network: its interface goes down and the system closes its
        TCP connections to ``peer`` (as a phone's OS does when Wi-Fi or cellular goes away)."""
        if shutil.which("ss") is None:
            raise NetnsError("cannot close the device's connections: 'ss' (iproute2) is missing")
        _ip(["-n", self.namespace, "link", "set", self.device_if, "down"])
        _run(self.command(["ss", "-K", "-t", "dst", peer]))

    def restore(self) -> None:
        """The network comes back (same address; the shaping stays on the interfaces)."""
        _ip(["-n", self.namespace, "link", "set", self.device_if, "up"])

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """Packets sent and dropped by each end's root qdisc: ``download`` and ``upload``."""
        return {
            "download": _root_qdisc_stats([], self.host_if),
            "upload": _root_qdisc_stats(["-n", self.namespace], self.device_if),
        }

    def report(self) -> dict:
        return {
            "namespace": self.namespace, "address": self.address, "wanted": str(self.impairment),
            "applied": dict(self.applied), "missing": dict(self.missing),
        }  # fmt: skip


def unavailable_reason() -> str | None:
    """Why this process cannot build test networks (for a skip), or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command (iproute2) is not installed"
    if not _has_capability(CAP_NET_ADMIN):
        return (f"creating network namespaces needs CAP_NET_ADMIN (root); this process runs as "
                f"uid {os.geteuid()} without it")  # fmt: skip
    probe = f"fcm-probe-{secrets.token_hex(3)}"
    try:
        _ip(["netns", "add", probe])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    _ip(["netns", "del", probe])
    return None


class TestNetwork:
    """A bridge on the host and namespaces linked to it; removed on exit (also on failure)."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = _free_subnet()
        hosts = self.subnet.hosts()
        self.address = str(next(hosts))  # the host's (the coordinator's) address
        self._hosts = hosts
        self.bridge = f"fc{self.tag}br"
        self.links: list[Link] = []
        self._interfaces: list[str] = []  # host-side veth ends (deleting one deletes its pair)
        self._namespaces: list[str] = []
        self._bridge_made = False
        self.netem_error: str | None = None

    def __enter__(self) -> TestNetwork:
        try:
            _ip(["link", "add", self.bridge, "type", "bridge"])
            self._bridge_made = True
            # The host's TCP sends through the bridge: one packet per buffer (see add()).
            _ip(["link", "set", self.bridge, "gso_max_segs", "1"])
            _ip(["addr", "add", f"{self.address}/{self.subnet.prefixlen}", "dev", self.bridge])
            _ip(["link", "set", self.bridge, "up"])
            self.netem_error = self._probe_netem()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, label: str, impairment: Impairment) -> Link:
        """A namespace ``label`` whose link to the bridge carries ``impairment``."""
        index = len(self.links)
        namespace = f"fcm-{self.tag}-{label}"
        _ip(["netns", "add", namespace])
        self._namespaces.append(namespace)
        device_if, host_if = f"fc{self.tag}{index}d", f"fc{self.tag}{index}h"
        link = Link(label, namespace, str(next(self._hosts)), device_if, host_if, impairment)
        relay_needed = bool(impairment.delay_ms) and self.netem_error is not None
        if relay_needed:  # device_if <-> .."a" [relay] .."b" <-> host_if (the bridge port)
            outer = f"fc{self.tag}{index}a"
            self._veth(device_if, outer)
            self._veth(f"fc{self.tag}{index}b", host_if)
        else:
            self._veth(device_if, host_if)
        _ip(["link", "set", device_if, "netns", namespace])
        # One packet per buffer both ways, so loss and shaping act on packets as on a radio link
        # (a 64 KB GSO buffer would be dropped, or let through a rate limit, as one).
        _ip(["-n", namespace, "link", "set", device_if, "gso_max_segs", "1"])
        _ip(["link", "set", host_if, "gso_max_segs", "1"])
        _ip(["link", "set", host_if, "master", self.bridge])
        prefix = self.subnet.prefixlen
        _ip(["-n", namespace, "addr", "add", f"{link.address}/{prefix}", "dev", device_if])
        for args in (["link", "set", "lo", "up"], ["link", "set", device_if, "up"]):
            _ip(["-n", namespace, *args])
        _ip(["link", "set", host_if, "up"])
        self.links.append(link)
        self._shape(link)
        if relay_needed:
            self._splice_relay(link, index)
        return link

    def reports(self) -> list[dict]:
        """What each link wanted, what was applied and how, and what could not be (why)."""
        return [link.report() for link in self.links]

    def close(self) -> None:
        """Remove every relay, link, namespace and the bridge made; raise if one is left."""
        problems = []
        for link in self.links:
            if link.relay is not None:
                link.relay.close()
        steps = [["link", "del", name] for name in reversed(self._interfaces)]
        steps += [["netns", "del", name] for name in reversed(self._namespaces)]
        steps += [["link", "del", self.bridge]] if self._bridge_made else []
        for args in steps:
            try:
                _ip(args)
            except NetnsError as exc:
                if "Cannot find device" not in str(exc):  # gone with its namespace or pair
                    problems.append(str(exc))
        self._interfaces, self._namespaces, self._bridge_made = [], [], False
        if problems:
            raise NetnsError("; ".join(problems))

    # -- building ---------------------------------------------------------------------------

    def _veth(self, one: str, other: str) -> None:
        _ip(["link", "add", one, "type", "veth", "peer", "name", other])
        self._interfaces.append(other)

    def _probe_netem(self) -> str | None:
        """None when this kernel has netem, else tc's error adding one."""
        probe_a, probe_b = f"fc{self.tag}pa", f"fc{self.tag}pb"
        self._veth(probe_a, probe_b)
        try:
            _tc([], ["qdisc", "add", "dev", probe_a, "root", "netem", "delay", "1ms"])
        except NetnsError as exc:
            return str(exc)
        finally:
            _ip(["link", "del", probe_b])
            self._interfaces.remove(probe_b)
        return None

    def _shape(self, link: Link) -> None:
        imp = link.impairment
        ends = [([], link.host_if), (["-n", link.namespace], link.device_if)]
        if not imp.kinds:
            return
        if self.netem_error is None:
            args = []
            args += ["delay", f"{imp.delay_ms:g}ms"] if imp.delay_ms else []
            args += ["loss", f"{imp.loss * 100:g}%"] if imp.loss else []
            args += ["rate", f"{imp.rate_mbit:g}mbit"] if imp.rate_mbit else []
            for netns, dev in ends:
                _tc(netns, ["qdisc", "add", "dev", dev, "root", "netem", *args])
            for kind in imp.kinds:
                link.applied[kind] = f"netem {' '.join(args)} on both ends"
            return
        if imp.rate_mbit or imp.loss:
            self._shape_without_netem(link, ends)

    def _shape_without_netem(self, link: Link, ends: list[tuple[list[str], str]]) -> None:
        imp = link.impairment
        rate = f"{imp.rate_mbit:g}mbit" if imp.rate_mbit else HTB_UNLIMITED
        try:
            for netns, dev in ends:
                _tc(netns, ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                            "default", "10"])  # fmt: skip
                _tc(netns, ["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                            "rate", rate, "ceil", rate])  # fmt: skip
        except NetnsError as exc:
            for kind in ("rate", "loss"):
                if getattr(imp, {"rate": "rate_mbit", "loss": "loss"}[kind]):
                    link.missing[kind] = f"netem: {self.netem_error}; htb: {exc}"
            return
        if imp.rate_mbit:
            link.applied["rate"] = f"htb rate {rate} on both ends (no netem: {self.netem_error})"
        if not imp.loss:
            return
        threshold = round(imp.loss * 2**32)
        try:
            for netns, dev in ends:
                _tc(netns, ["class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb",
                            "rate", rate, "ceil", rate])  # fmt: skip
                _tc(netns, ["qdisc", "add", "dev", dev, "parent", "1:20", "pfifo", "limit", "0"])
                _tc(netns, ["filter", "add", "dev", dev, "parent", "1:", "bpf", "bytecode",
                            BPF_LOSS.format(threshold=threshold), "classid", "1:20"])  # fmt: skip
        except NetnsError as exc:
            link.missing["loss"] = f"netem: {self.netem_error}; bpf loss filter: {exc}"
            return
        link.applied["loss"] = (
            f"cls_bpf prandom < {imp.loss:.2%} -> pfifo limit 0, on both ends "
            f"(no netem: {self.netem_error})"
        )

    def _splice_relay(self, link: Link, index: int) -> None:
        outer, inner = f"fc{self.tag}{index}a", f"fc{self.tag}{index}b"
        for dev in (outer, inner):
            # The relay's interfaces are wires, not hosts: no ARP, no IPv6 chatter of their own.
            _ip(["link", "set", dev, "arp", "off", "up"])
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6").write_text("1")
        try:
            link.relay = FrameRelay(outer, inner, link.impairment.delay_ms / 1000)
        except OSError as exc:
            link.missing["delay"] = f"netem: {self.netem_error}; frame relay: {exc}"
            return
        link.applied["delay"] = (
            f"user-space frame relay, {link.impairment.delay_ms:g} ms each way "
            f"(no netem: {self.netem_error})"
        )


# -- measuring a link -------------------------------------------------------------------------

# Runs inside a namespace: connect a few times (the quickest connect is one round trip; the first
# also waits for ARP), then on the last connection read N bytes, send N bytes and wait for the
# one-byte answer that says all arrived; prints the durations.
_PROBE_CONNECTS = 3
_PROBE_CLIENT = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rtt = float("inf")
for _ in range(CONNECTS):
    t = time.monotonic(); s = socket.create_connection((host, port), timeout=60)
    rtt = min(rtt, time.monotonic() - t)
got, t = 0, time.monotonic()
while got < n:
    data = s.recv(65536)
    if not data:
        sys.exit("the probe server closed early")
    got += len(data)
down = time.monotonic() - t
t = time.monotonic(); s.sendall(bytes(n)); s.recv(1); up = time.monotonic() - t
print(json.dumps({"rtt_s": rtt, "down_s": down, "up_s": up}))
""".replace("CONNECTS", str(_PROBE_CONNECTS))


def measure(link: Link, host_address: str, nbytes: int = 200_000) -> dict[str, float]:
    """Round trip (TCP connect) and goodput both ways, in Mbit/s, of ``nbytes`` over ``link``.

    The transfer times exclude one round trip each (the first byte's way there and the last
    one's way back), so a link's goodput is compared with its rate, not with its delay.
    """
    with socket.create_server((host_address, 0)) as server:
        server.settimeout(60)
        client = subprocess.Popen(
            link.command([sys.executable, "-c", _PROBE_CLIENT, host_address,
                          str(server.getsockname()[1]), str(nbytes)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for _ in range(_PROBE_CONNECTS - 1):
                server.accept()[0].close()
            conn, _ = server.accept()
            with conn:
                conn.sendall(bytes(nbytes))
                got = 0
                while got < nbytes:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got += len(data)
                conn.sendall(b"k")
                out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    if client.returncode != 0:
        raise NetnsError(f"link probe in {link.namespace} failed: {err.strip()}")
    times = json.loads(out)
    rtt = times["rtt_s"]
    mbit = nbytes * 8 / 1e6
    return {
        "rtt_ms": rtt * 1000,
        "down_mbit": mbit / max(times["down_s"] - rtt, 1e-6),
        "up_mbit": mbit / max(times["up_s"] - rtt, 1e-6),
    }


# -- helpers ----------------------------------------------------------------------------------


def _run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        error = (done.stderr or done.stdout).strip().replace("\n", " ")
        raise NetnsError(f"`{' '.join(args)}` failed: {error}")
    return done.stdout


def _ip(args: list[str]) -> str:
    return _run(["ip", *args])


def _tc(netns: list[str], args: list[str]) -> str:
    return _run(["tc", *netns, *args])


def _root_qdisc_stats(netns: list[str], dev: str) -> dict[str, int]:
    for qdisc in json.loads(_tc(netns, ["-s", "-j", "qdisc", "show", "dev", dev])):
        if qdisc.get("root"):
            return {"packets": qdisc["packets"], "drops": qdisc["drops"], "kind": qdisc["kind"]}
    raise NetnsError(f"{dev} has no root qdisc")


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of the host overlaps."""
    routes = json.loads(_ip(["-j", "-4", "route", "show", "table", "all"]))
    used = [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r["dst"] != "default"]
    for dev in json.loads(_ip(["-j", "-4", "addr"])):
        used += [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
                 for a in dev["addr_info"]]  # fmt: skip
    rng = random.SystemRandom()
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{rng.randrange(64, 255)}.{rng.randrange(256)}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise NetnsError("no free 10.x.y.0/24 for a test network")
