"""The coordinator's run directory: config, per-round metrics, and every round's model.

    run.json                  the configuration the run was started with
    models/round-NNNN.mlmodel the global model after round NNNN (round 0: the initial model);
                              models/version-NNNN.mlmodel in an asynchronous (fedbuff) run,
                              whose "rounds" below are its model versions
    models/version-NNNN.state.npz  a fedbuff run's server optimiser state (momentum, adam)
    updates/version-NNNN/     the updates a fedbuff version applied, as received (--keep-updates)
    commits.jsonl             one JSON line per committed round: its model's sha256 and size,
                              and what its exchanges with the devices yielded
    metrics.jsonl             one JSON line per round, once its model has been judged
    final.mlmodel             the model the run ended with

A round is *committed* once its model file and then its line in commits.jsonl are durable; the
coordinator commits a model version before any device can be told of it, so a version names one
model for good, across crashes and restarts too. Judging comes later: metrics.jsonl may trail
commits.jsonl by the rounds being judged when the process died, and a resumed run judges them.
Every write replaces a file atomically and durably (temporary file, fsync, rename, fsync of the
folder), so a crash never leaves a half-written file behind.
Files are 0644 and folders 0755: anyone on the machine may read a run. Nothing is created until
a new run records its configuration (:meth:`RunDirectory.write_config`), which refuses a
directory that already holds another run; opening one to resume creates nothing.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic, write_text_atomic
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex


class RunDirectoryError(FedCoreMLError):
    """A run directory that cannot be used: missing, inconsistent, or holding another run."""


RUN_DIR_MODE = 0o755
ASYNC_STRATEGY = "fedbuff"  # a run of this strategy publishes versions, not rounds


class RunDirectory:
    """The files of one run in ``path``; constructing it touches nothing on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.models = self.path / "models"
        self.updates = self.path / "updates"
        self._model_stem: str | None = None  # "round" or "version", from run.json

    @property
    def model_stem(self) -> str:
        """How model files are named: ``version`` in a fedbuff run, else ``round``."""
        if self._model_stem is None:
            strategy = ""
            if self.config_file.exists():
                strategy = str(self.read_config().get("strategy", "")).lower()
            stem = "version" if strategy == ASYNC_STRATEGY else "round"
            if not self.config_file.exists():
                return stem  # not cached: the run's config may be written later
            self._model_stem = stem
        return self._model_stem

    @property
    def config_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def commits_file(self) -> Path:
        return self.path / "commits.jsonl"

    @property
    def final_model(self) -> Path:
        return self.path / "final.mlmodel"

    def round_model(self, round_number: int) -> Path:
        return self.models / f"{self.model_stem}-{round_number:04d}.mlmodel"

    def server_state(self, version: int) -> Path:
        return self.models / f"version-{version:04d}.state.npz"

    def version_updates(self, version: int) -> Path:
        return self.updates / f"version-{version:04d}"

    def check_new(self, can_resume: bool = True) -> None:
        """Refuse to start a new run here if the directory already holds one.

        The message points at ``--resume`` unless ``can_resume`` is false (``fedcoreml demo``).
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{self.path}: not a directory; choose another --run-dir")
        # (commits.jsonl is never without run.json, which is written first)
        held = [f.name for f in (self.config_file, self.metrics_file) if f.exists()]
        if held:
            resume = f"continue it with --resume {shlex.quote(str(self.path))}, or "
            raise RunDirectoryError(
                f"{self.path} already holds a run ({', '.join(held)}); "
                f"{resume if can_resume else ''}choose a new --run-dir"
            )

    def write_config(self, config: dict[str, Any]) -> None:
        """Start the run's record: create the directory and write run.json.

        Refuses a directory that holds another run. Rewriting run.json of the same run (its
        ``run_id``) is allowed while no round is committed: a run stopped before its first commit
        and resumed starts from the beginning.
        """
        recorded = self.read_config() if self.config_file.exists() else None
        restart = recorded is not None and not (
            self.commits_file.exists() or self.metrics_file.exists()
        )
        if not (restart and recorded.get("run_id") == config.get("run_id")):
            self.check_new()
        _make_dir(self.path)
        _make_dir(self.models)
        write_text_atomic(self.config_file, json.dumps(config, indent=2, sort_keys=True))
        self._model_stem = None  # named after the strategy just recorded

    def write_round_model(self, round_number: int, data: bytes) -> Path:
        _make_dir(self.models)
        return write_bytes_atomic(self.round_model(round_number), data)

    def write_server_state(self, version: int, data: bytes) -> Path:
        _make_dir(self.models)
        return write_bytes_atomic(self.server_state(version), data)

    def read_server_state(self, version: int) -> bytes | None:
        path = self.server_state(version)
        return path.read_bytes() if path.exists() else None

    def write_updates(self, version: int, updates: list[tuple[str, dict[str, np.ndarray]]]) -> None:
        """Keep what a version applied, as received: ``updates/version-NNNN/NAME.npz`` each.

        The folder is emptied first: a version run again after a crash keeps only its own.
        """
        folder = self.version_updates(version)
        if folder.exists():
            shutil.rmtree(folder)
        _make_dir(self.updates)
        _make_dir(folder)
        for name, arrays in updates:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_bytes_atomic(folder / f"{name}.npz", buffer.getvalue())

    def read_update(self, version: int, name: str) -> dict[str, np.ndarray]:
        path = self.version_updates(version) / f"{name}.npz"
        if not path.exists():
            raise RunDirectoryError(
                f"{path}: missing; a run replays only with the updates it kept (--keep-updates)"
            )
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}

    def write_final_model(self, data: bytes) -> Path:
        return write_bytes_atomic(self.final_model, data)

    def append_commit(self, line: dict[str, Any]) -> None:
        """Record a round as committed (its model file must be durable already).

        The first commit of a run recorded before commits.jsonl existed carries its metrics
        lines' rounds over, so that the file still starts at round 0.
        """
        if not self.commits_file.exists() and self.metrics_file.exists():
            for old in self.read_metrics():
                _append_line(self.commits_file, {k: old[k] for k in ("round", "model_sha256")})
        _append_line(self.commits_file, line)

    def append_metrics(self, line: dict[str, Any]) -> None:
        _append_line(self.metrics_file, line)

    def read_commits(self) -> list[dict[str, Any]]:
        return _read_lines(self.commits_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_lines(self.metrics_file)

    def read_config(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise RunDirectoryError(f"{self.path}: no such run directory")
        if not self.config_file.exists():
            raise RunDirectoryError(f"{self.path}: no run.json; not a fedcoreml run directory")
        try:
            config = json.loads(self.config_file.read_text())
        except ValueError as exc:
            raise RunDirectoryError(f"{self.config_file}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise RunDirectoryError(f"{self.config_file}: expected a JSON object")
        return config

    def committed(self) -> list[dict[str, Any]]:
        """The committed rounds' records, 0, 1, 2 ... in order, each checked against its file.

        A model file without its commit record (a crash in between) does not count: that round
        was never shown to a device and is run again. A missing model file, a file whose sha256
        differs from its record, a gap in the rounds, or a metrics line that names another
        model than the commit of its round is refused as a damaged run directory. A run
        recorded before commits.jsonl existed counts its metrics lines as its commits.
        """
        commits = self.read_commits()
        metrics = self.read_metrics()
        source = self.commits_file.name
        if not self.commits_file.exists():
            commits, source = metrics, self.metrics_file.name
        for expected, line in enumerate(commits):
            round_number = int(line["round"])
            if round_number != expected:
                raise RunDirectoryError(
                    f"{self.path / source}: round {round_number} where round {expected} "
                    "was expected"
                )
            self._check_model(round_number, line["model_sha256"], source)
        for line in metrics:
            round_number = int(line["round"])
            if round_number >= len(commits):
                raise RunDirectoryError(
                    f"{self.metrics_file}: round {round_number} was never committed"
                )
            if line["model_sha256"] != commits[round_number]["model_sha256"]:
                raise RunDirectoryError(
                    f"{self.metrics_file}: round {round_number} names model "
                    f"{line['model_sha256'][:12]}... but {source} committed "
                    f"{commits[round_number]['model_sha256'][:12]}..."
                )
        return commits

    def remove_leftovers(self) -> list[Path]:
        """Delete the temporary files of writes a crash interrupted; returns what was deleted.

        Such a file (``.NAME.XXXX.tmp``, see ios_bridge/atomic_file.py) never replaced its
        target, so nothing refers to it. Call it only while no write is under way.
        """
        leftovers = [p for folder in (self.path, self.models) for p in folder.glob(".*.tmp")]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def last_committed_round(self) -> int | None:
        """The last committed round (see :meth:`committed`), or None before round 0's commit."""
        commits = self.committed()
        return len(commits) - 1 if commits else None

    def unjudged(self, commits: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Commit records of the committed rounds without a metrics line yet, in order.

        ``commits``: what :meth:`committed` returned, if it was just called.
        """
        judged = {int(line["round"]) for line in self.read_metrics()}
        commits = self.committed() if commits is None else commits
        return [line for line in commits if int(line["round"]) not in judged]

    def _check_model(self, round_number: int, sha256: str, source: str) -> None:
        path = self.round_model(round_number)
        if not path.exists():
            raise RunDirectoryError(f"{path}: missing, but {source} records round {round_number}")
        digest = sha256_hex(path.read_bytes())
        if digest != sha256:
            raise RunDirectoryError(
                f"{path}: sha256 {digest[:12]}... differs from the {sha256[:12]}... recorded in "
                f"{source}"
            )


def _append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one JSON line by rewriting the file atomically: never a torn last line."""
    existing = path.read_text() if path.exists() else ""
    write_text_atomic(path, existing + json.dumps(line, sort_keys=True) + "\n")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except ValueError as exc:
        raise RunDirectoryError(f"{path}: not valid JSON lines ({exc})") from None


def _make_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0755, whatever the umask; keep an existing one."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(RUN_DIR_MODE)
