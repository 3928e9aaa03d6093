"""Replaying a fedbuff run: every version rebuilt from version 0 and the updates it applied.

A fedbuff run directory records, in each version's commit line, the updates the version applied
in the order applied (node, base version, staleness, weight, sha256 of the trained arrays), and
with ``--keep-updates`` the trained arrays themselves. :func:`replay` starts from the committed
version 0, recomputes each version with the same maths (fedbuff_math.py) and the run's recorded
server optimiser settings, bakes it into an .mlmodel and compares its sha256 with the commit.
Across a ``--resume`` too: the replay carries the server state from version 0, so a resumed run
that restored its state exactly replays to the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcoreml.ios_bridge.mlmodel_io import load_spec
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.server.fedbuff import FedBuff, update_digest
from fedcoreml.server.fedbuff_math import (
    Arrays,
    BufferedUpdate,
    ServerState,
    buffer_mean,
    server_step,
    staleness_weight,
)
from fedcoreml.server.model_store import ModelStore
from fedcoreml.server.run_config import CoordinatorConfig
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError
from fedcoreml.server.strategies import make_strategy


@dataclass(frozen=True)
class ReplayedVersion:
    version: int
    updates: int
    sha256: str  # of the rebuilt .mlmodel, equal to the commit's


def replay(
    run_dir: str | Path, on_version: Callable[[ReplayedVersion], None] | None = None
) -> list[ReplayedVersion]:
    """Rebuild every committed version of a fedbuff run; RunDirectoryError at the first mismatch."""
    directory = RunDirectory(run_dir)
    saved = directory.read_config()
    config = CoordinatorConfig.from_json({**saved, "run_dir": str(run_dir)})
    if not config.asynchronous:
        raise RunDirectoryError(f"{run_dir}: a {config.strategy} run; only fedbuff runs replay")
    strategy = make_strategy(
        config.strategy,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_devices=config.min_devices,
        options=config.strategy_args,
    )
    assert isinstance(strategy, FedBuff)
    commits = directory.committed()
    if not commits:
        raise RunDirectoryError(f"{run_dir}: nothing committed yet")
    spec = load_spec(directory.round_model(0))
    model_name = str(saved.get("model_name", "default model"))
    store = ModelStore(spec, model_name)
    versions: dict[int, Arrays] = {0: dict(get_parameters(spec, model_name))}
    state = ServerState()
    replayed = []
    for commit in commits[1:]:
        version = int(commit["round"])
        deltas = _deltas(directory, version, commit, versions, strategy.staleness_exponent)
        new, state = server_step(
            versions[version - 1], buffer_mean(deltas), strategy.optimizer, state
        )
        versions[version] = {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}
        model = store.build(list(versions[version].items()), version)
        if model.sha256 != commit["model_sha256"]:
            raise RunDirectoryError(
                f"version {version}: replayed to sha256 {model.sha256[:12]}... but the run "
                f"committed {commit['model_sha256'][:12]}..."
            )
        done = ReplayedVersion(version, len(deltas), model.sha256)
        replayed.append(done)
        if on_version is not None:
            on_version(done)
    return replayed


def _deltas(
    directory: RunDirectory,
    version: int,
    commit: dict,
    versions: dict[int, Arrays],
    exponent: float,
) -> list[BufferedUpdate]:
    applied = commit.get("applied")
    if not applied:
        raise RunDirectoryError(f"version {version}: its commit records no applied updates")
    deltas = []
    for entry in applied:
        where = f"version {version}, update {entry.get('file') or entry['update_sha256'][:12]}"
        if entry.get("file") is None:
            raise RunDirectoryError(f"{where}: not kept; a run replays only with --keep-updates")
        trained = directory.read_update(version, entry["file"])
        if update_digest(trained) != entry["update_sha256"]:
            raise RunDirectoryError(f"{where}: the kept arrays differ from what was applied")
        weight = entry["num_examples"] * staleness_weight(entry["staleness"], exponent)
        if weight != entry["weight"]:
            raise RunDirectoryError(f"{where}: weight {entry['weight']} recorded, {weight} now")
        base = versions.get(int(entry["base_version"]))
        if base is None:
            raise RunDirectoryError(f"{where}: based on version {entry['base_version']}, unknown")
        delta = {k: trained[k] - base[k] for k in base}
        deltas.append(
            BufferedUpdate(
                str(entry["node_id"]), int(entry["base_version"]), int(entry["staleness"]),
                int(entry["num_examples"]), weight, delta,
            )
        )  # fmt: skip
    return deltas
