"""A user-space wire with latency: Ethernet frames between two interfaces, each one late.

For kernels built without ``sch_netem`` (tests/netns.py uses netem whenever it exists). Two host
interfaces, each the end of a veth pair, are joined by this relay: every frame received on one is
sent out of the other ``delay_s`` later, in order, both ways, like netem's fixed delay on both
ends of a link. Frames are read and written with ``PACKET_VNET_HDR`` so the checksum-offload and
GSO metadata of each frame travels with it (a frame that still needs its TCP checksum filled in
stays valid on the other side). Like netem, at most ``limit`` frames wait in each direction;
more are dropped and counted.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass

SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sent: not one to carry
MAX_FRAME = 65536 + 64  # a GSO frame plus its virtio-net header
POLL_S = 0.2  # how often the threads look at the stop flag


@dataclass
class DirectionStats:
    forwarded: int = 0
    dropped: int = 0  # queue full
    send_errors: int = 0  # e.g. the far interface is down (a link cut)


class _Direction:
    """Frames read from ``src``, held until due, written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, limit: int):
        self.src, self.dst, self.delay_s, self.limit = src, dst, delay_s, limit
        self.stats = DirectionStats()
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ready = threading.Condition()

    def receive(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                frame, address = self.src.recvfrom(MAX_FRAME)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                raise
            if address[2] == PACKET_OUTGOING:
                continue
            with self._ready:
                if len(self._queue) >= self.limit:
                    self.stats.dropped += 1
                    continue
                self._queue.append((time.monotonic() + self.delay_s, frame))
                self._ready.notify()

    def send(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._ready:
                if not self._queue:
                    self._ready.wait(POLL_S)
                    continue
                due, frame = self._queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                stop.wait(wait)
                continue
            with self._ready:
                self._queue.popleft()
            try:
                self.dst.send(frame)
                self.stats.forwarded += 1
            except OSError:
                self.stats.send_errors += 1


class FrameRelay:
    """Joins host interfaces ``a`` and ``b`` with ``delay_s`` of latency each way until closed.

    Raises OSError at construction when the packet sockets cannot be opened (no CAP_NET_RAW, no
    such interface).
    """

    def __init__(self, a: str, b: str, delay_s: float, limit: int = 1000) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.a, self.b, self.delay_s = a, b, delay_s
        self._sockets = [_packet_socket(a)]
        try:
            self._sockets.append(_packet_socket(b))
        except OSError:
            self._sockets[0].close()
            raise
        sock_a, sock_b = self._sockets
        self.a_to_b = _Direction(sock_a, sock_b, delay_s, limit)
        self.b_to_a = _Direction(sock_b, sock_a, delay_s, limit)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=work, args=(self._stop,), daemon=True, name=f"relay-{a}-{b}")
            for direction in (self.a_to_b, self.b_to_a)
            for work in (direction.receive, direction.send)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * POLL_S + self.delay_s)
        for sock in self._sockets:
            sock.close()

    def describe(self) -> str:
        return f"{self.a}->{self.b} {self.a_to_b.stats}, {self.b}->{self.a} {self.b_to_a.stats}"


def _packet_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((interface, ETH_P_ALL))
        sock.settimeout(POLL_S)
    except OSError:
        sock.close()
        raise
    return sock
