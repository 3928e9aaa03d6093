"""A read-only view of a run directory, finished or still running, as frozen dataclasses.

:func:`read_run` reads what :class:`~fedcoreml.server.run_dir.RunDirectory` writes: the
configuration (run.json), the committed model versions (commits.jsonl, each checked against its
file), the judged rounds (metrics.jsonl) and whether the run has ended (final.mlmodel). The
report, the dashboard and the Python API all read runs through it.

A running coordinator keeps writing while this reads. Every file is replaced atomically, so no
read sees a torn file; but commits.jsonl and metrics.jsonl are two files, and a round committed
and judged between reading one and the other looks inconsistent. Such a read is retried: a real
inconsistency (a damaged directory) persists and is reported as a
:class:`~fedcoreml.server.run_dir.RunDirectoryError` naming the file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError

__all__ = ["MetricsLine", "ModelVersion", "RunState", "RunView", "read_run"]

RunState = Literal["running", "finished"]

# A live run commits and judges a round in well under this; a damaged one never settles.
_READ_ATTEMPTS = 4
_RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class ModelVersion:
    """One committed global model: the round (or async version) number, its file, sha256, size.

    For :attr:`RunView.final_model`, ``version`` is the committed version final.mlmodel equals.
    """

    version: int
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class MetricsLine:
    """One judged round, a line of metrics.jsonl (schema: protos/README.md).

    The named fields are those every line carries; ``raw`` holds the whole line, fields added
    later included.
    """

    round: int
    model_sha256: str
    test_accuracy: float | None
    test_loss: float | None
    devices_sampled: int | None
    devices_reported: int | None
    devices_failed: int | None
    examples: int | None
    seconds: float | None
    evaluated_devices: int | None
    device_accuracy: float | None
    abandoned_attempts: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_line(cls, line: Mapping[str, Any], where: Path) -> MetricsLine:
        if not isinstance(line, Mapping) or "round" not in line or "model_sha256" not in line:
            raise RunDirectoryError(f"{where}: a line without 'round' and 'model_sha256': {line}")
        return cls(
            round=int(line["round"]),
            model_sha256=str(line["model_sha256"]),
            test_accuracy=_number(line, "test_accuracy", where),
            test_loss=_number(line, "test_loss", where),
            devices_sampled=_integer(line, "devices_sampled", where),
            devices_reported=_integer(line, "devices_reported", where),
            devices_failed=_integer(line, "devices_failed", where),
            examples=_integer(line, "examples", where),
            seconds=_number(line, "seconds", where),
            evaluated_devices=_integer(line, "evaluated_devices", where),
            device_accuracy=_number(line, "device_accuracy", where),
            abandoned_attempts=_integer(line, "abandoned_attempts", where),
            raw=MappingProxyType(dict(line)),
        )


@dataclass(frozen=True)
class RunView:
    """Everything a run directory held at the moment it was read."""

    path: Path
    config: Mapping[str, Any] = field(repr=False)
    models: tuple[ModelVersion, ...]
    metrics: tuple[MetricsLine, ...]
    final_model: ModelVersion | None

    @property
    def state(self) -> RunState:
        """``finished`` once final.mlmodel is written, else ``running`` (or stopped midway)."""
        return "finished" if self.final_model is not None else "running"

    @property
    def latest_model(self) -> ModelVersion | None:
        """The last committed model version, or None before round 0's commit."""
        return self.models[-1] if self.models else None

    def model(self, version: int) -> ModelVersion:
        """The committed model of round (version) ``version``."""
        for model in self.models:
            if model.version == version:
                return model
        raise RunDirectoryError(
            f"{self.path}: no committed model version {version} "
            f"(committed: {_span([m.version for m in self.models])})"
        )

    def metrics_for(self, version: int) -> MetricsLine | None:
        """The metrics line of round ``version``, or None while it is not judged yet."""
        return next((line for line in self.metrics if line.round == version), None)


def read_run(path: str | Path, verify: bool = True) -> RunView:
    """Read the run directory ``path`` (see the module docstring for a run still being written).

    Raises RunDirectoryError for a missing directory, one without run.json, and a damaged one
    (a model file that differs from its commit record, torn or contradictory JSON lines).
    ``verify=False`` skips hashing every model file against its commit record (the check
    :meth:`RunDirectory.committed` makes), for a caller that polls a long run often; the
    records are still read in order and each model file must exist.
    """
    directory = RunDirectory(path)
    for attempt in range(_READ_ATTEMPTS):
        try:
            return _read_once(directory, verify)
        except RunDirectoryError:
            if attempt == _READ_ATTEMPTS - 1 or not _may_be_moving(directory):
                raise
            time.sleep(_RETRY_PAUSE_S)
    raise AssertionError("unreachable")  # the loop returns or raises


def _read_once(directory: RunDirectory, verify: bool) -> RunView:
    config = directory.read_config()
    # Whether the run ended is read first: a final model seen means every commit before it is
    # on disk already, so the commits read next are complete.
    final = _final_model(directory)
    commits = directory.committed() if verify else _commit_records(directory)
    models = tuple(
        ModelVersion(
            version=int(line["round"]),
            path=directory.round_model(int(line["round"])),
            sha256=str(line["model_sha256"]),
            size_bytes=directory.round_model(int(line["round"])).stat().st_size,
        )
        for line in commits
    )
    metrics = tuple(
        sorted(
            (
                MetricsLine.from_line(line, directory.metrics_file)
                for line in directory.read_metrics()
            ),
            key=lambda line: line.round,
        )
    )
    return RunView(
        path=directory.path,
        config=MappingProxyType(config),
        models=models,
        metrics=metrics,
        final_model=_final_version(directory, final, models),
    )


def _commit_records(directory: RunDirectory) -> list[dict[str, Any]]:
    """The commit records without hashing the model files (see :func:`read_run`)."""
    exists = directory.commits_file.exists()
    records = directory.read_commits() if exists else directory.read_metrics()
    source = directory.commits_file if exists else directory.metrics_file
    for expected, line in enumerate(records):
        if int(line["round"]) != expected:
            raise RunDirectoryError(
                f"{source}: round {line['round']} where round {expected} was expected"
            )
        if not directory.round_model(expected).exists():
            raise RunDirectoryError(
                f"{directory.round_model(expected)}: missing, but {source.name} records round "
                f"{expected}"
            )
    return records


def _final_model(directory: RunDirectory) -> bytes | None:
    try:
        return directory.final_model.read_bytes()
    except FileNotFoundError:
        return None


def _final_version(
    directory: RunDirectory, data: bytes | None, models: tuple[ModelVersion, ...]
) -> ModelVersion | None:
    """final.mlmodel as the committed version it is (the run's last round's model)."""
    if data is None:
        return None
    digest = sha256_hex(data)
    for model in reversed(models):
        if model.sha256 == digest:
            return ModelVersion(model.version, directory.final_model, digest, len(data))
    raise RunDirectoryError(
        f"{directory.final_model}: sha256 {digest[:12]}... is not any committed model's"
    )


def _may_be_moving(directory: RunDirectory) -> bool:
    """A run without final.mlmodel may still be writing; a finished one is read as it is."""
    return directory.path.is_dir() and not directory.final_model.exists()


def _number(line: Mapping[str, Any], key: str, where: Path) -> float | None:
    value = line.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunDirectoryError(
            f"{where}: round {line['round']}: '{key}' is not a number: {value!r}"
        )
    return float(value)


def _integer(line: Mapping[str, Any], key: str, where: Path) -> int | None:
    value = line.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunDirectoryError(
            f"{where}: round {line['round']}: '{key}' is not an integer: {value!r}"
        )
    return value


def _span(versions: list[int]) -> str:
    if not versions:
        return "none"
    return f"{versions[0]}..{versions[-1]}" if len(versions) > 1 else str(versions[0])
