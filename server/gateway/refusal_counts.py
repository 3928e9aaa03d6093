"""How often the gateway refused, by reason: the keys of :mod:`~fedcoreml.server.gateway.refusals`.

The device service and the authentication interceptor count every refusal they answer with,
so that a read-only view (the dashboard's Fleet page) can show refusals by reason and how many
calls were rate-limited without reading the logs.
"""

from __future__ import annotations

import threading
from collections import Counter


class RefusalCounts:
    """A thread-safe counter of refusal keys."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        """Every key counted so far and its count, as a copy."""
        with self._lock:
            return dict(self._counts)
