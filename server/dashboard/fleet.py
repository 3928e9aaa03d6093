"""The Fleet page's data: a read-only snapshot of the coordinator's devices, tasks and refusals.

Everything is copied out of the gateway under its own short locks (``SessionRegistry.snapshot``,
``TaskBoard.pending``, ``RefusalCounts.snapshot``) and then shaped here, with no lock held: a
dashboard never holds the coordinator's locks while it works or writes to a browser.
Device ids are cut short and every string a device sent is bounded (``ios_bridge/echo.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fedcoreml.ios_bridge.echo import capped
from fedcoreml.server.gateway.refusal_counts import RefusalCounts
from fedcoreml.server.gateway.refusals import RATE_LIMITED
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import TaskBoard

__all__ = ["DEVICE_ROWS", "SHOWN_ID_CHARS", "FleetSource", "fleet_snapshot", "short_id"]

#: Characters of a device id shown; the rest is cut (the page need not identify a phone).
SHOWN_ID_CHARS = 10
#: Devices listed one by one (most recently seen first); the counts cover all of them.
DEVICE_ROWS = 200
_LABEL_BYTES = 48  # a platform or app version string shown on the page


@dataclass(frozen=True)
class FleetSource:
    """Where a live coordinator keeps its fleet; the dashboard only reads it."""

    registry: SessionRegistry
    board: TaskBoard
    refusals: RefusalCounts
    min_devices: int


def short_id(device_id: str) -> str:
    """``device_id`` cut to :data:`SHOWN_ID_CHARS` characters, marked with … when cut."""
    if len(device_id) <= SHOWN_ID_CHARS:
        return device_id
    return device_id[:SHOWN_ID_CHARS] + "…"


def _label(text: str) -> str:
    return capped(text, _LABEL_BYTES) if text else "(not given)"


def fleet_snapshot(source: FleetSource) -> dict[str, Any]:
    """The Fleet page as one JSON-ready dict (see the module)."""
    now, sessions = source.registry.snapshot()
    pending = source.board.pending()
    refusals = source.refusals.snapshot()
    work: dict[int, str] = {}
    for node_id, kind, _round in pending:
        if work.get(node_id) != "training":  # training shows over evaluating
            work[node_id] = "training" if kind == "train" else "evaluating"
    rows = []
    states: Counter[str] = Counter()
    for session, live in sessions:
        state = work.get(session.node_id, "idle") if live else "gone"
        states[state] += 1
        rows.append(
            {
                "device": short_id(session.device_id),
                "platform": _label(session.platform),
                "os_version": _label(session.os_version),
                "app_version": _label(session.app_version),
                "state": state,
                "last_seen_s": round(max(now - session.last_seen, 0.0), 1),
            }
        )
    rows.sort(key=lambda row: row["last_seen_s"])
    tasks: Counter[tuple[int, str]] = Counter((rnd, kind) for _node, kind, rnd in pending)
    training_rounds = [rnd for _node, kind, rnd in pending if kind == "train"]
    connected = len(sessions) - states["gone"]
    return {
        "registered": len(sessions),
        "connected": connected,
        "training": states["training"],
        "evaluating": states["evaluating"],
        "idle": states["idle"],
        "min_devices": source.min_devices,
        "round_in_progress": max(training_rounds, default=None),
        "tasks": [
            {"kind": kind, "round": rnd, "pending": count}
            for (rnd, kind), count in sorted(tasks.items())
        ],
        "refusals": dict(sorted(refusals.items(), key=lambda item: (-item[1], item[0]))),
        "rate_limited": refusals.get(RATE_LIMITED.key, 0),
        "by_platform": _counts(row["platform"] for row in rows),
        "by_app_version": _counts(row["app_version"] for row in rows),
        "devices": rows[:DEVICE_ROWS],
        "devices_not_listed": max(len(rows) - DEVICE_ROWS, 0),
    }


def _counts(values) -> dict[str, int]:
    return dict(Counter(values).most_common())
