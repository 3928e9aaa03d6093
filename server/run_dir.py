"""The coordinator's run directory: config, per-round metrics, and every round's model.

    run.json                  the configuration the run was started with
    metrics.jsonl             one JSON line per round
    models/round-NNNN.mlmodel the global model after round NNNN (round 0: the initial model)
    final.mlmodel             the model the run ended with

Every write replaces a file atomically, so a crash never leaves a half-written file behind.
Files are 0644 and folders 0755: anyone on the machine may read a run. Nothing is created until
a new run records its configuration (:meth:`RunDirectory.write_config`), which refuses a
directory that already holds another run; opening one to resume creates nothing.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic, write_text_atomic
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex


class RunDirectoryError(FedCoreMLError):
    """A run directory that cannot be used: missing, inconsistent, or holding another run."""


RUN_DIR_MODE = 0o755


class RunDirectory:
    """The files of one run in ``path``; constructing it touches nothing on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.models = self.path / "models"

    @property
    def config_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_model(self) -> Path:
        return self.path / "final.mlmodel"

    def round_model(self, round_number: int) -> Path:
        return self.models / f"round-{round_number:04d}.mlmodel"

    def check_new(self, can_resume: bool = True) -> None:
        """Refuse to start a new run here if the directory already holds one.

        The message points at ``--resume`` unless ``can_resume`` is false (``fedcoreml demo``).
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{self.path}: not a directory; choose another --run-dir")
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
        ``run_id``) is allowed while no round is recorded: a run stopped before its first record
        and resumed starts from the beginning.
        """
        recorded = self.read_config() if self.config_file.exists() else None
        restart = recorded is not None and not self.metrics_file.exists()
        if not (restart and recorded.get("run_id") == config.get("run_id")):
            self.check_new()
        _make_dir(self.path)
        _make_dir(self.models)
        write_text_atomic(self.config_file, json.dumps(config, indent=2, sort_keys=True))

    def write_round_model(self, round_number: int, data: bytes) -> Path:
        _make_dir(self.models)
        return write_bytes_atomic(self.round_model(round_number), data)

    def write_final_model(self, data: bytes) -> Path:
        return write_bytes_atomic(self.final_model, data)

    def append_metrics(self, line: dict[str, Any]) -> None:
        existing = self.metrics_file.read_text() if self.metrics_file.exists() else ""
        write_text_atomic(self.metrics_file, existing + json.dumps(line, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

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

    def last_committed_round(self) -> int | None:
        """The last round whose model file and metrics line are both complete and agree.

        A round is committed once its metrics line is written, which happens after its model
        file; a model file without its line (a crash in between) does not count, and a file
        whose sha256 differs from the one recorded is refused as corrupt.
        """
        last = None
        for line in self.read_metrics():
            round_number = int(line["round"])
            path = self.round_model(round_number)
            if not path.exists():
                raise RunDirectoryError(f"{path}: missing, but metrics.jsonl records round "
                                        f"{round_number}")  # fmt: skip
            digest = sha256_hex(path.read_bytes())
            if digest != line["model_sha256"]:
                raise RunDirectoryError(
                    f"{path}: sha256 {digest[:12]}... differs from the {line['model_sha256'][:12]}"
                    "... recorded in metrics.jsonl"
                )
            last = round_number
        return last


def _make_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0755, whatever the umask; keep an existing one."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(RUN_DIR_MODE)
