"""The coordinator: serves devices over gRPC and runs rounds with a Flower strategy.

One run: wait for enough devices, run R rounds of the chosen strategy over DeviceGrid, and after
every round bake the new global parameters into the exact .mlmodel that will be shipped next,
judge it with the reference interpreter on held-out data, and record it in the run directory.
Then tell the devices the run is finished. No TensorFlow here: only the spec, numpy and Flower.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from fedcoreml.client_sim.data import Dataset, load_dataset
from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.gateway.auth import DEFAULT_BURST, DeviceAuthInterceptor, RateLimiter
from fedcoreml.ios_bridge.gateway.service import DeviceService, start_server
from fedcoreml.ios_bridge.gateway.sessions import SessionRegistry
from fedcoreml.ios_bridge.gateway.task_board import RoundModel, TaskBoard
from fedcoreml.ios_bridge.gateway.tls import server_credentials
from fedcoreml.ios_bridge.gateway.tokens import TokenStore
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import load_spec, spec_from_bytes
from fedcoreml.ios_bridge.network import parse_network
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.update_params import TrainingConfig, parse_update_params
from fedcoreml.server.device_grid import (
    BATCH_SIZE_KEY,
    EPOCHS_KEY,
    LEARNING_RATE_KEY,
    DeviceGrid,
    RoundPolicy,
    arrays_to_parameters,
    parameters_to_arrays,
)
from fedcoreml.server.flower_identity import set_task_identity
from fedcoreml.server.model_store import ModelStore
from fedcoreml.server.run_dir import RunDirectory
from fedcoreml.server.strategies import averages_first, make_strategy

log = logging.getLogger("fedcoreml.coordinator")


class CoordinatorConfigError(FedCoreMLError):
    """A coordinator option out of range."""


@dataclass
class CoordinatorConfig:
    run_dir: Path
    rounds: int
    min_devices: int
    listen: str = "127.0.0.1:0"
    fraction: float = 1.0
    fraction_evaluate: float = 0.0
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None  # None: the default model
    model_seed: int = 0
    local_epochs: int | None = None  # None: the model's defaults
    batch_size: int | None = None
    learning_rate: float | None = None
    round_timeout: float = 600.0
    eval_data: str | None = None  # None: the bundled sample's test set
    session_ttl: float = 30.0
    poll_interval_ms: int = 500
    long_poll_ms: int = 2000  # GetTask waits this long for work before answering "wait"
    tls_cert: Path | None = None  # with tls_key: serve devices over TLS
    tls_key: Path | None = None
    require_tokens: bool = False  # devices must present a token from the run's tokens.json
    rate_limit: float = 5.0  # calls per second per device (with tokens), burst 20
    over_selection: float = 1.0  # e.g. 1.3: ask 30 % more devices, close at the number wanted
    min_reports: int = 1  # fewer valid reports: the round is abandoned and sent again
    max_attempts: int = 3
    # Average updates as they arrive (strategies that start with FedAvg's mean): memory stays
    # one model's worth however many devices report. False holds every update to round end.
    mean_on_arrival: bool = True

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CoordinatorConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["run_dir"] = Path(values["run_dir"])
        for key in ("model", "tls_cert", "tls_key"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float
    test_loss: float
    devices_sampled: int
    devices_reported: int
    devices_failed: int
    examples: int
    seconds: float
    model_sha256: str
    evaluated_devices: int = 0
    device_accuracy: float | None = None
    abandoned_attempts: int = 0  # sent again for too few reports


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
        self.on_round = on_round
        # Resuming: rounds up to and including this one are committed in the run directory.
        self.resume_after = resume_after
        self.start_round = resume_after or 0
        if config.rounds < 1:
            raise CoordinatorConfigError(f"--rounds must be at least 1, got {config.rounds}")
        if config.min_devices < 1:
            raise CoordinatorConfigError(
                f"--min-devices must be at least 1, got {config.min_devices}"
            )
        if not 0 < config.fraction <= 1:
            raise CoordinatorConfigError(f"--fraction must lie in (0, 1], got {config.fraction}")
        if config.over_selection < 1:
            raise CoordinatorConfigError(
                f"--over-selection must be at least 1, got {config.over_selection}"
            )
        if not 1 <= config.min_reports <= config.min_devices:
            raise CoordinatorConfigError(
                f"--min-reports must lie in [1, --min-devices={config.min_devices}], "
                f"got {config.min_reports}"
            )
        if config.poll_interval_ms < 1 or config.long_poll_ms < 0:
            raise CoordinatorConfigError(
                "--poll-interval-ms must be positive and --long-poll-ms not negative, got "
                f"{config.poll_interval_ms} and {config.long_poll_ms}"
            )
        if config.round_timeout <= 0:
            raise CoordinatorConfigError(
                f"--round-timeout must be positive, got {config.round_timeout}"
            )
        self.spec, self.model_name = self._load_model()
        network = parse_network(self.spec, self.model_name)
        self.training: TrainingConfig = parse_update_params(self.spec, network).resolve(
            config.local_epochs, config.batch_size, config.learning_rate
        )
        self.probabilities = self.training.loss.input
        self.strategy = make_strategy(
            config.strategy,
            fraction_train=config.fraction,
            fraction_evaluate=config.fraction_evaluate,
            min_devices=config.min_devices,
            options=config.strategy_args,
        )
        self.eval_data: Dataset = load_dataset(config.eval_data)
        self.run_dir = RunDirectory(config.run_dir)
        self.store = ModelStore(self.spec, self.model_name)
        self.registry = SessionRegistry(idle_ttl_s=config.session_ttl)
        self.board = TaskBoard()
        self.service = DeviceService(
            self.registry, self.board, self.store.infos, config.poll_interval_ms,
            long_poll_ms=config.long_poll_ms,
        )  # fmt: skip
        self.run_id = run_id if run_id is not None else secrets.randbits(63)
        self.grid = DeviceGrid(
            self.registry, self.board, self.store, self.run_id, config.round_timeout,
            round_offset=self.start_round,
            policy=RoundPolicy(
                config.over_selection, config.min_reports, config.max_attempts,
                mean_on_arrival=config.mean_on_arrival and averages_first(config.strategy),
            ),
        )  # fmt: skip
        self.records: list[RoundRecord] = []
        self._server = None
        self.port: int | None = None

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        listen: str | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> Coordinator:
        """Continue the run in ``run_dir`` after its last committed round."""
        saved = RunDirectory(run_dir).read_config()
        config = CoordinatorConfig.from_json({**saved, "run_dir": str(run_dir)})
        if listen is not None:
            config.listen = listen
        last = RunDirectory(run_dir).last_committed_round()
        return cls(config, on_round, resume_after=last, run_id=int(saved["run_id"]))

    def _load_model(self) -> tuple[Model_pb2.Model, str]:
        if self.resume_after is not None:
            # The committed global model, bit for bit: architecture, settings and parameters.
            path = RunDirectory(self.config.run_dir).round_model(self.resume_after)
            name = str(self.config.model) if self.config.model else "default model"
            return load_spec(path), name
        if self.config.model is None:
            return build_default_model(seed=self.config.model_seed), "default model"
        return load_spec(self.config.model), str(self.config.model)

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
            if not any(info.status == "active" for info in tokens.list()):
                log.warning(
                    "no active device token in %s/tokens.json: every device will be refused "
                    "(create some with: fedcoreml tokens create --run-dir %s)",
                    config.run_dir, config.run_dir,
                )  # fmt: skip
            interceptors.append(
                DeviceAuthInterceptor(tokens, RateLimiter(config.rate_limit, DEFAULT_BURST))
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

    def run(self) -> Path:
        """Run every round; returns the path of final.mlmodel."""
        if self._server is None:
            self.start()
        config = self.config
        if self.resume_after is None:
            self.run_dir.write_config(
                {**config.to_json(), "model_name": self.model_name, "run_id": self.run_id}
            )
        else:
            committed = self.store.build(get_parameters(self.spec, self.model_name), 0)
            log.info(
                "resuming run %d after round %d of %d (global model sha256 %s)",
                self.run_id, self.resume_after, config.rounds, committed.sha256,
            )  # fmt: skip
        set_task_identity(self.run_id)
        initial = parameters_to_arrays(get_parameters(self.spec, self.model_name))
        train_config = ConfigRecord(
            {
                EPOCHS_KEY: self.training.epochs,
                BATCH_SIZE_KEY: self.training.batch_size,
                LEARNING_RATE_KEY: self.training.learning_rate,
            }
        )
        log.info(
            "run %d: %s, %d round(s), waiting for %d device(s); local training: %d epoch(s), "
            "batch %d, lr %g",
            self.run_id, config.strategy, config.rounds, config.min_devices,
            self.training.epochs, self.training.batch_size, self.training.learning_rate,
        )  # fmt: skip
        remaining = config.rounds - self.start_round
        if remaining <= 0:  # every round was committed before the crash: just finish
            return self._complete(initial)
        self._judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._judgements: list[Future[RoundRecord]] = []
        try:
            result = self.strategy.start(
                grid=self.grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=config.round_timeout,
                train_config=train_config,
                evaluate_config=ConfigRecord(),
                evaluate_fn=self._after_round,
            )
        finally:
            self._judge.shutdown(wait=True)
        for judgement in self._judgements:
            judgement.result()  # re-raise a failure of the evaluation thread
        return self._complete(result.arrays if len(result.arrays) else initial)

    def _complete(self, arrays: ArrayRecord) -> Path:
        final = self.store.build(arrays_to_parameters(arrays), version=self.config.rounds)
        path = self.run_dir.write_final_model(final.data)
        self._finish(final)
        log.info("run finished: %s (sha256 %s)", path, final.sha256[:12])
        return path

    def _finish(self, final: RoundModel) -> None:
        """Tell the devices, and give every live one a chance to hear it before stopping."""
        self.board.finish_run(final)
        grace_end = time.monotonic() + 2 * self.config.poll_interval_ms / 1000 + 1.0
        while time.monotonic() < grace_end and not self.board.told_finished(
            self.registry.live_node_ids()
        ):
            time.sleep(0.05)

    # -- per round ----------------------------------------------------------------------------

    def _after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Flower's evaluate_fn: build the model that will be shipped next, and have it recorded.

        Writing its file and judging it (reference interpreter on the held-out set) run on one
        background thread, overlapping the next round; files and metrics lines still come out in
        round order, and all of them are written before ``run`` returns.
        """
        if self.resume_after is not None and server_round == 0:
            return  # Flower's "initial" evaluation is the committed round, recorded already
        server_round += self.start_round
        start = time.monotonic()
        model = self.store.build(arrays_to_parameters(arrays), version=server_round)
        exchanges = [s for s in self.grid.history if s.round == server_round]
        seconds = sum(s.seconds for s in exchanges) + time.monotonic() - start
        self._judgements.append(
            self._judge.submit(self._judge_round, server_round, model, exchanges, seconds)
        )

    def _judge_round(
        self, server_round: int, model: RoundModel, exchanges: list, seconds: float
    ) -> RoundRecord:
        self.run_dir.write_round_model(server_round, model.data)
        # Judge the bytes exactly as a device receives them.
        judged = ReferenceInterpreter(spec_from_bytes(model.data), self.model_name)
        loss, accuracy = judged.evaluate(
            self.eval_data.x_test, self.eval_data.y_test, self.probabilities
        )
        train = next((s for s in exchanges if s.kind == "train"), None)
        evaluate = next((s for s in exchanges if s.kind == "evaluate"), None)
        record = RoundRecord(
            round=server_round,
            test_accuracy=round(accuracy, 6),
            test_loss=round(loss, 6),
            devices_sampled=train.sampled if train else 0,
            devices_reported=train.reported if train else 0,
            devices_failed=train.failed if train else 0,
            examples=train.examples if train else 0,
            seconds=round(seconds, 3),
            model_sha256=model.sha256,
            evaluated_devices=evaluate.reported if evaluate else 0,
            device_accuracy=evaluate.accuracy if evaluate else None,
            abandoned_attempts=train.abandoned if train else 0,
        )
        self.run_dir.append_metrics(asdict(record))
        self.records.append(record)
        log.info(
            "round %d: test accuracy %.4f, loss %.4f (%d/%d devices reported, %d examples)",
            server_round, accuracy, loss, record.devices_reported, record.devices_sampled,
            record.examples,
        )  # fmt: skip
        if self.on_round is not None:
            self.on_round(record)
        return record
