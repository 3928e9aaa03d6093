"""Bounded echoes: how a string the other side sent is shown in an error message or a log line.

A device controls its device id, task ids, tensor names, platform and version strings, and any
of them may be megabytes long or hold newlines and control characters. Shown back, each one is
quoted and escaped like Python's ``repr`` (so it stays on one line), cut to ``limit`` characters
with its full length noted: ``'aaaa…' (10,000 chars)``. A whole status message is then capped
in bytes (:func:`capped`), below gRPC's limit on metadata, which carries it.
"""

from __future__ import annotations

__all__ = ["ECHO_CHARS", "MAX_DETAILS_BYTES", "capped", "shown"]

#: Characters of a client string kept when it is shown back.
ECHO_CHARS = 64
#: Longest status message (UTF-8 bytes); gRPC's whole metadata limit is 8 KiB by default, and
#: the message travels percent-encoded (up to three bytes on the wire per byte here).
MAX_DETAILS_BYTES = 1024


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """``value`` quoted on one line, cut to ``limit`` characters with its length noted."""
    text = value if isinstance(value, str) else str(value)
    quoted = repr(text[:limit])  # escapes newlines and every other unprintable character
    if len(text) <= limit:
        return quoted
    return f"{quoted[:-1]}…{quoted[-1]} ({len(text):,} chars)"


def capped(message: str, limit_bytes: int = MAX_DETAILS_BYTES) -> str:
    """``message`` on one line and at most ``limit_bytes`` of UTF-8, cut with its size noted."""
    line = message if message.isprintable() else _one_line(message)
    data = line.encode("utf-8")
    if len(data) <= limit_bytes:
        return line
    note = f"… ({len(data):,} bytes)"
    keep = limit_bytes - len(note.encode("utf-8"))
    return data[:keep].decode("utf-8", errors="ignore") + note


def _one_line(message: str) -> str:
    """Unprintable characters (newlines, controls) escaped as ``repr`` would write them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
