"""The Run and Models pages' data: the run directory, re-read only when one of its files changed.

:class:`RunFeed` stats the files the coordinator writes (run.json, commits.jsonl, metrics.jsonl,
final.mlmodel); when any changed it reads the run through
:func:`~fedcoreml.server.run_view.read_run` and keeps the result as JSON-ready dicts. Every file
is replaced atomically by the coordinator, so a read never sees a torn one; a stat costs
microseconds, so polling it often costs the rounds nothing. The read does not hash every model
file (``verify=False``: a long run holds hundreds of 2.3 MB models); a model's bytes are checked
against their commit record when the dashboard serves or asks that model (models.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError
from fedcoreml.server.run_view import RunView, read_run

__all__ = ["RunFeed"]

_Stamp = tuple[tuple[int, int, int] | None, ...]


class RunFeed:
    """The latest read of one run directory (see the module); not thread-safe, one reader."""

    def __init__(self, run_dir: str | Path) -> None:
        self.directory = RunDirectory(run_dir)
        self._stamp: _Stamp | None = None
        self.view: RunView | None = None
        self.error: str | None = None  # why the last read failed (a damaged directory)

    def refresh(self) -> bool:
        """Re-read the run if a file changed since the last read; whether anything changed."""
        directory = self.directory
        files = (
            directory.config_file,
            directory.commits_file,
            directory.metrics_file,
            directory.final_model,
        )
        stamp = tuple(_stat(path) for path in files)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp[0] is None:  # no run.json yet: the coordinator has not started the run
            self.view, self.error = None, None
            return True
        try:
            self.view, self.error = read_run(directory.path, verify=False), None
        except (RunDirectoryError, OSError, ValueError, KeyError, TypeError) as exc:
            # a damaged or unreadable directory: keep the last good view, and say what is wrong
            self.error = str(exc) if isinstance(exc, RunDirectoryError) else f"{exc!r}"
        return True

    def run_json(self) -> dict[str, Any]:
        """Configuration, phase and committed models: everything of the Run page but the rounds."""
        view = self.view
        base: dict[str, Any] = {"run_dir": str(self.directory.path), "error": self.error}
        if view is None:
            return {**base, "phase": "starting", "config": {}, "models": [], "final": None}
        return {
            **base,
            "phase": view.state,
            "config": dict(view.config),
            "rounds_planned": view.config.get("rounds"),
            "models": [
                {"version": m.version, "sha256": m.sha256, "size_bytes": m.size_bytes}
                for m in view.models
            ],
            "final": None
            if view.final_model is None
            else {"sha256": view.final_model.sha256, "size_bytes": view.final_model.size_bytes},
        }

    def rounds_json(self) -> list[dict[str, Any]]:
        """Every judged round's metrics line, in round order (schema: protos/README.md)."""
        return [] if self.view is None else [dict(line.raw) for line in self.view.metrics]


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
