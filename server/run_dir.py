"""The coordinator's run directory: config, per-round metrics, and every round's model.

    run.json                  the configuration the run was started with
    metrics.jsonl             one JSON line per round
    models/round-NNNN.mlmodel the global model after round NNNN (round 0: the initial model)
    final.mlmodel             the model the run ended with

Every write replaces a file atomically, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic, write_text_atomic
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex


class RunDirectoryError(FedCoreMLError):
    """A run directory that cannot be resumed: missing or inconsistent files."""


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.models = self.path / "models"
        self.models.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_model(self) -> Path:
        return self.path / "final.mlmodel"

    def round_model(self, round_number: int) -> Path:
        return self.models / f"round-{round_number:04d}.mlmodel"

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(self.path / "run.json", json.dumps(config, indent=2, sort_keys=True))

    def write_round_model(self, round_number: int, data: bytes) -> Path:
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
        path = self.path / "run.json"
        if not path.exists():
            raise RunDirectoryError(f"{self.path}: no run.json; not a fedcoreml run directory")
        return json.loads(path.read_text())

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
