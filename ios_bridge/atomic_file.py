"""Atomic, durable file writes: a reader sees the old file or the new one, never half of either.

The data goes to a temporary file in the same folder, which is flushed to disk and renamed over
the target; the folder is then synced too, so the rename itself survives a power cut. The file
gets exactly ``mode`` (not filtered by the umask): 0644 for records anyone may read, 0600 for
secrets such as private keys and tokens.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PUBLIC_FILE_MODE = 0o644
SECRET_FILE_MODE = 0o600


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, mode: int = PUBLIC_FILE_MODE
) -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # Before any byte is written: a secret is never readable by others, not even briefly.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(target.parent)
    return target


def write_text_atomic(
    path: str | os.PathLike[str], text: str, mode: int = PUBLIC_FILE_MODE
) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename, a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
