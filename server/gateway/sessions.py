"""Registered devices, their sessions, node ids and liveness.

A device is live while it keeps calling (any RPC refreshes it) within the idle TTL, or while it
holds a task whose deadline has not passed. Node ids are what Flower's Grid calls nodes. The
coordinator samples only live devices whose last reported capabilities meet the eligibility rule.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace

from fedcoreml.ios_bridge.channel import valid_device_id
from fedcoreml.ios_bridge.echo import shown
from fedcoreml.server.gateway.eligibility import Capabilities, EligibilityRule
from fedcoreml.server.gateway.refusals import (
    INVALID_DEVICE_ID,
    MISSING_SESSION,
    SESSION_OF_OTHER_DEVICE,
    UNKNOWN_SESSION,
)


@dataclass
class Session:
    session_id: str
    node_id: int
    device_id: str
    platform: str
    os_version: str
    app_version: str
    last_seen: float
    held_until: float = 0.0  # a device holding a task stays live until this (monotonic) time
    capabilities: Capabilities | None = None  # as last reported; None: never reported


class SessionRegistry:
    """Thread-safe registry of device sessions."""

    def __init__(
        self,
        idle_ttl_s: float = 30.0,
        clock=time.monotonic,
        eligibility: EligibilityRule | None = None,
    ) -> None:
        self.idle_ttl_s = idle_ttl_s
        self.eligibility = eligibility or EligibilityRule()
        self._clock = clock
        self._lock = threading.Lock()
        self._by_session: dict[str, Session] = {}
        self._by_device: dict[str, Session] = {}
        self._by_node: dict[int, Session] = {}

    def register(
        self,
        device_id: str,
        platform: str = "",
        os_version: str = "",
        app_version: str = "",
        capabilities: Capabilities | None = None,
    ) -> Session:
        """A new session for ``device_id``; one it had before is replaced (keeping its node)."""
        if not valid_device_id(device_id):
            raise INVALID_DEVICE_ID.error(device_id=shown(device_id))
        with self._lock:
            previous = self._by_device.get(device_id)
            if previous is not None:
                self._by_session.pop(previous.session_id, None)
                node_id = previous.node_id
            else:
                node_id = self._new_node_id()
            session = Session(
                session_id=secrets.token_hex(16),
                node_id=node_id,
                device_id=device_id,
                platform=platform,
                os_version=os_version,
                app_version=app_version,
                last_seen=self._clock(),
                capabilities=capabilities,
            )
            self._by_session[session.session_id] = session
            self._by_device[device_id] = session
            self._by_node[node_id] = session
            return session

    def _new_node_id(self) -> int:
        while True:
            node_id = secrets.randbits(63) or 1
            if node_id not in self._by_node:
                return node_id

    def touch(self, session_id: str, device_id: str | None = None) -> Session:
        """The live session with this id, refreshed; refused (NOT_FOUND) if unknown or expired.

        With ``device_id`` (the caller's authenticated device), a session of another device is
        refused (PERMISSION_DENIED) and left as it was.
        """
        with self._lock:
            session = self._by_session.get(session_id)
            if session is None or not self._is_live(session, self._clock()):
                raise (UNKNOWN_SESSION if session_id else MISSING_SESSION).error()
            if device_id is not None and session.device_id != device_id:
                raise SESSION_OF_OTHER_DEVICE.error(device_id=shown(device_id))
            session.last_seen = self._clock()
            return session

    def report(self, node_id: int, capabilities: Capabilities | None) -> str | None:
        """Record what a device reports about itself (None: nothing, the last report stands).

        Returns why the device may not be given work now, or None when it may.
        """
        with self._lock:
            session = self._by_node.get(node_id)
            if session is None:
                return self.eligibility.check(capabilities)
            if capabilities is not None:
                session.capabilities = capabilities
            return self.eligibility.check(session.capabilities)

    def hold(self, node_id: int, until: float) -> None:
        """Keep a node live until ``until`` (monotonic), while it works on a task."""
        with self._lock:
            session = self._by_node.get(node_id)
            if session is not None:
                session.held_until = max(session.held_until, until)

    def release(self, node_id: int) -> None:
        with self._lock:
            session = self._by_node.get(node_id)
            if session is not None:
                session.held_until = 0.0
                session.last_seen = self._clock()

    def _is_live(self, session: Session, now: float) -> bool:
        if self._by_session.get(session.session_id) is not session:
            return False
        return now - session.last_seen <= self.idle_ttl_s or now <= session.held_until

    def is_live(self, node_id: int) -> bool:
        with self._lock:
            session = self._by_node.get(node_id)
            return session is not None and self._is_live(session, self._clock())

    def live_node_ids(self, eligible_only: bool = True) -> list[int]:
        """Live nodes; by default only those whose last reported capabilities are eligible."""
        with self._lock:
            now = self._clock()
            return [
                s.node_id
                for s in self._by_session.values()
                if self._is_live(s, now)
                and (not eligible_only or self.eligibility.check(s.capabilities) is None)
            ]

    def session_of(self, node_id: int) -> Session | None:
        with self._lock:
            return self._by_node.get(node_id)

    def snapshot(self) -> tuple[float, list[tuple[Session, bool]]]:
        """For read-only views: the registry's clock now, and a copy of every device's current
        session with whether it is live."""
        with self._lock:
            now = self._clock()
            return now, [(replace(s), self._is_live(s, now)) for s in self._by_device.values()]
