"""fedcoreml's ServerApp: the coordinator's run on whatever Grid Flower's runtime provides.

``flwr run .`` (simulation or deployment runtime) starts this with Flower's Grid, whose nodes are
virtual clients or SuperNodes running fedcoreml's ClientApp. It runs the same
:class:`~fedcoreml.server.federated_run.FederatedRun` as ``fedcoreml server`` — the strategy,
the per-round .mlmodel, server-side judging with the reference interpreter, the run directory —
configured from the run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden with
``flwr run --run-config``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.server.exchanges import RecordingGrid
from fedcoreml.server.federated_run import FederatedRun
from fedcoreml.server.run_config import CoordinatorConfig
from fedcoreml.server.strategies import parse_strategy_args

log = logging.getLogger("fedcoreml.flower_app")

app = ServerApp()


class FlowerRunError(FedCoreMLError):
    """A run on Flower's runtime that did not federate (e.g. every ClientApp failed)."""


def config_from_run_config(run_config: dict[str, Any], run_id: int) -> CoordinatorConfig:
    """The run's configuration from Flower's run config (see pyproject.toml for the keys)."""

    def text(key: str) -> str | None:
        value = str(run_config.get(key, "")).strip()
        return value or None

    def positive(key: str, cast: type) -> Any:
        value = cast(run_config.get(key, 0))
        return value if value > 0 else None  # 0: the model's own default

    run_dir = text("run-dir") or f"runs/flower-{run_id}"
    strategy = str(run_config["strategy"])
    strategy_args = parse_strategy_args((text("strategy-args") or "").split(), strategy)
    asynchronous = strategy.lower() == "fedbuff"
    return CoordinatorConfig(
        run_dir=Path(run_dir),
        rounds=int(run_config["num-server-rounds"]),
        min_devices=int(run_config["min-nodes"]),
        # fedbuff keeps `concurrency` nodes busy instead of sampling a fraction per round
        fraction=1.0 if asynchronous else float(run_config["fraction-train"]),
        fraction_evaluate=float(run_config["fraction-evaluate"]),
        strategy=strategy,
        strategy_args=strategy_args,
        model=Path(model) if (model := text("model")) else None,
        local_epochs=positive("local-epochs", int),
        batch_size=positive("batch-size", int),
        learning_rate=positive("lr", float),
        round_timeout=float(run_config["round-timeout"]),
        eval_data=text("eval-data-dir") or text("data-dir"),
        **(_fedbuff_settings(run_config) if asynchronous else {}),
    )


def _fedbuff_settings(run_config: dict[str, Any]) -> dict[str, Any]:
    """The asynchronous strategy's CoordinatorConfig fields from the run config (0: default)."""
    concurrency = int(run_config.get("concurrency", 0))
    buffer = int(run_config.get("buffer", 0))
    target = float(run_config.get("target-accuracy", 0.0))
    return {
        "concurrency": concurrency or None,
        "buffer_size": buffer or None,
        "max_staleness": int(run_config.get("max-staleness", 10)),
        "target_accuracy": target or None,
        "keep_updates": bool(run_config.get("keep-updates", False)),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(dict(context.run_config), context.run_id)
    run = FederatedRun(config, run_id=context.run_id)
    keep = bool(context.run_config.get("keep-updates", False)) and not config.asynchronous
    recording = RecordingGrid(grid, keep_dir=run.run_dir.path / "updates" if keep else None)
    log.info("fedcoreml ServerApp: run %d into %s", context.run_id, config.run_dir)
    run.run(recording, ship_architecture=True, judge_in_background=False)
    if config.asynchronous:
        if run.final_version == run.start_round:
            raise FlowerRunError("fedbuff published no version; see the ClientApps' logs")
        return
    trained = [s for s in recording.history if s.kind == "train"]
    if not any(s.reported for s in trained):
        # Flower still calls such a run completed; it learned nothing, so say it failed.
        failures = sum(s.failed for s in trained)
        raise FlowerRunError(
            f"no node returned an update in {len(trained)} round(s) ({failures} failure(s)); "
            "see the SuperNodes' / simulation's logs for the ClientApp's error"
        )
