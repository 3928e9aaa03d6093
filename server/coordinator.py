"""The coordinator: serves devices over gRPC and runs a federated run over them.

The device side — the gRPC gateway (TLS, tokens, rate limits), the session registry, the task
board and DeviceGrid, Flower's Grid whose nodes are those devices — around one
:class:`~fedcoreml.server.federated_run.FederatedRun`, the part shared with the Flower App.
Every model version is committed to the run directory before a task or ``RunFinished`` names
it (see :meth:`FederatedRun.publish`). Once the last round is done, the devices are told the run
is finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedcoreml.ios_bridge.datasets import Dataset
from fedcoreml.server.device_grid import DeviceGrid, RoundPolicy
from fedcoreml.server.federated_run import FederatedRun
from fedcoreml.server.flower_identity import set_task_identity
from fedcoreml.server.gateway.auth import DEFAULT_BURST, DeviceAuthInterceptor, RateLimiter
from fedcoreml.server.gateway.eligibility import EligibilityRule
from fedcoreml.server.gateway.service import DeviceService, HandoutSchedule, start_server
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard
from fedcoreml.server.gateway.tls import server_credentials
from fedcoreml.server.gateway.tokens import TokenStore
from fedcoreml.server.run_config import (
    CoordinatorConfig,
    CoordinatorConfigError,
    RoundRecord,
)
from fedcoreml.server.run_dir import RunDirectory

__all__ = ["Coordinator", "CoordinatorConfig", "CoordinatorConfigError", "RoundRecord"]

log = logging.getLogger("fedcoreml.coordinator")


class Coordinator:
    """Build once, then ``start()`` (listen) and ``run()`` (blocks until the last round)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        on_round: Callable[[RoundRecord], None] | None = None,
        resume_after: int | None = None,
        run_id: int | None = None,
    ) -> None:
        self.config = config
        self.federated = FederatedRun(config, on_round, resume_after, run_id)
        self.registry = SessionRegistry(
            idle_ttl_s=config.session_ttl,
            eligibility=EligibilityRule(
                config.require_charging, config.require_unmetered, config.min_battery
            ),
        )
        self.board = TaskBoard()
        self.service = DeviceService(
            self.registry, self.board, self.federated.store.infos, config.poll_interval_ms,
            long_poll_ms=config.long_poll_ms,
            handout=HandoutSchedule(config.handout_rate) if config.handout_rate else None,
        )  # fmt: skip
        self.grid = DeviceGrid(
            self.registry, self.board, self.federated.store, self.federated.run_id,
            config.round_timeout,
            round_offset=self.federated.start_round,
            policy=RoundPolicy(config.over_selection, config.min_reports, config.max_attempts),
            publish=self.federated.publish,
        )  # fmt: skip
        self._server = None
        self.port: int | None = None

    @property
    def records(self) -> list[RoundRecord]:
        return self.federated.records

    @property
    def eval_data(self) -> Dataset:
        return self.federated.eval_data

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        listen: str | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> Coordinator:
        """Continue the run in ``run_dir`` after its last committed round."""
        directory = RunDirectory(run_dir)
        saved = directory.read_config()
        config = CoordinatorConfig.from_json({**saved, "run_dir": str(run_dir)})
        if listen is not None:
            config.listen = listen
        last = directory.last_committed_round()
        return cls(config, on_round, resume_after=last, run_id=int(saved["run_id"]))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> int:
        config = self.config
        credentials = None
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise CoordinatorConfigError("--tls-cert and --tls-key go together")
            credentials = server_credentials(config.tls_cert, config.tls_key)
        interceptors = []
        if config.require_tokens:
            tokens = TokenStore(config.run_dir)
            if not tokens.has_active():  # device tokens; a dashboard token opens no device port
                log.warning(
                    "no active device token in %s/tokens.json: every device will be refused "
                    "(create some with: fedcoreml tokens create --run-dir %s)",
                    config.run_dir, config.run_dir,
                )  # fmt: skip
            interceptors.append(
                DeviceAuthInterceptor(
                    tokens,
                    RateLimiter(config.rate_limit, DEFAULT_BURST),
                    self.service.refusal_counts,
                )
            )
        self._server, self.port = start_server(
            self.service, config.listen, credentials=credentials, interceptors=interceptors
        )
        log.info(
            "listening for devices on port %d (%s, %s)",
            self.port,
            "TLS" if credentials else "PLAINTEXT",
            "device tokens required" if config.require_tokens else "no device authentication",
        )
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def run(self, lingering: bool = False) -> Path:
        """Run every round; returns the path of final.mlmodel.

        ``lingering``: the caller keeps serving after this returns (``--linger``), so devices
        that come back later still hear that the run is finished.
        """
        if self._server is None:
            self.start()
        # Outside Flower's runtime nobody else sets the task identity Flower's messages need.
        set_task_identity(self.federated.run_id)
        final = self.federated.run(self.grid)
        self._finish(final, lingering)
        return self.federated.run_dir.final_model

    def _finish(self, final: RoundModel, lingering: bool) -> None:
        """Tell the devices, and give every live one a chance to hear it before stopping.

        An asynchronous run waits up to a session TTL for devices still training to return. A
        coordinator resumed after the last round was committed (killed at the very end) has
        no device yet: unless it lingers, it waits up to a session TTL for as many devices as
        the run needs to come back and hear it, instead of leaving them to retry into the void.
        """
        self.board.finish_run(final)
        now = time.monotonic()
        grace_end = now + 2 * self.config.poll_interval_ms / 1000 + 1.0
        if self.config.asynchronous:
            # fedbuff ends with devices mid-training by design: give each a session TTL to come
            # back, be refused its submission and hear that the run is finished
            grace_end = now + self.config.session_ttl
        wanted = 0
        if self.federated.start_round >= self.config.rounds and not lingering:
            grace_end, wanted = now + self.config.session_ttl, self.config.min_devices
        while time.monotonic() < grace_end:
            live = self.registry.live_node_ids(eligible_only=False)  # all are told
            if len(live) >= wanted and self.board.told_finished(live):
                return
            time.sleep(0.05)
