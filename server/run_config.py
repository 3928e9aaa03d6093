"""A run's configuration and what it records per round, shared by both ways of running it.

``fedcoreml server`` (devices over the gateway) and the Flower App's ServerApp (Flower's nodes)
run the same :class:`~fedcoreml.server.federated_run.FederatedRun` from a ``CoordinatorConfig``;
the gateway-only fields (listen address, TLS, tokens, pacing) are simply unused by the latter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.server.gateway.auth import DEFAULT_RATE_PER_S
from fedcoreml.server.run_dir import ASYNC_STRATEGY


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
    # Tasks handed out per second at most (0: as fast as asked): spreads a large fleet's
    # downloads over the round's first seconds instead of starting them all at once.
    handout_rate: float = 250.0
    long_poll_ms: int = 2000  # GetTask waits this long for work before answering "wait"
    tls_cert: Path | None = None  # with tls_key: serve devices over TLS
    tls_key: Path | None = None
    require_tokens: bool = False  # devices must present a token from the run's tokens.json
    rate_limit: float = DEFAULT_RATE_PER_S  # calls per second per device (with tokens)
    over_selection: float = 1.0  # e.g. 1.3: ask 30 % more devices, close at the number wanted
    min_reports: int = 1  # fewer valid reports: the round is abandoned and sent again
    max_attempts: int = 3
    # FedAvg and the optimisers built on its mean fold each update into the round's mean as it
    # arrives (mean_on_arrival.py): memory stays one model's worth however many devices report.
    # False (--hold-updates): Flower's own strategies, every update held to the round's end.
    mean_on_arrival: bool = True
    # Devices are sampled and handed tasks only while their last reported capabilities meet these.
    require_charging: bool = False
    require_unmetered: bool = False
    min_battery: float | None = None  # in [0, 1]; None: any level, even unknown
    # Asynchronous runs (strategy "fedbuff"): ``rounds`` counts model versions.
    concurrency: int | None = None  # devices training at once; None: --min-devices
    buffer_size: int | None = None  # updates per version; None: min(5, concurrency)
    max_staleness: int = 10  # an update trained this many versions back is still applied
    target_accuracy: float | None = None  # end the run once a version is judged this accurate
    keep_updates: bool = False  # keep every applied update (updates/), so the run can be replayed

    @property
    def asynchronous(self) -> bool:
        return self.strategy.lower() == ASYNC_STRATEGY

    @property
    def fedbuff_concurrency(self) -> int:
        return self.concurrency if self.concurrency is not None else self.min_devices

    @property
    def fedbuff_buffer(self) -> int:
        if self.buffer_size is not None:
            return self.buffer_size
        return min(5, self.fedbuff_concurrency)

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
    elapsed_s: float | None = None  # wall time from the run's start to this model's commit
    fedbuff: dict[str, Any] | None = None  # an asynchronous version's buffer (VersionRecord)

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl line (a synchronous round has no ``fedbuff`` object)."""
        line = asdict(self)
        if line["fedbuff"] is None:
            del line["fedbuff"]
        return line


# The RoundRecord fields a commit record also keeps (all but the judging's).
COMMITTED_FIELDS = tuple(
    name
    for name in RoundRecord.__dataclass_fields__
    if name not in ("round", "test_accuracy", "test_loss", "model_sha256")
)


def check_config(config: CoordinatorConfig) -> None:
    """Refuse options out of range, naming the command-line option."""
    if config.rounds < 1:
        raise CoordinatorConfigError(f"--rounds must be at least 1, got {config.rounds}")
    if config.min_devices < 1:
        raise CoordinatorConfigError(f"--min-devices must be at least 1, got {config.min_devices}")
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
    if not config.handout_rate >= 0:
        raise CoordinatorConfigError(
            f"--handout-rate must be 0 (no limit) or positive, got {config.handout_rate}"
        )
    if config.min_battery is not None and not 0 <= config.min_battery <= 1:
        raise CoordinatorConfigError(f"--min-battery must lie in [0, 1], got {config.min_battery}")
    if config.round_timeout <= 0:
        raise CoordinatorConfigError(
            f"--round-timeout must be positive, got {config.round_timeout}"
        )
    _check_asynchronous(config)


def _check_asynchronous(config: CoordinatorConfig) -> None:
    """fedbuff's options in range, and none of the synchronous-round options given with it."""
    if not config.asynchronous:
        given = [
            option
            for option, value in (
                ("--concurrency", config.concurrency),
                ("--buffer", config.buffer_size),
                ("--target-accuracy", config.target_accuracy),
            )
            if value is not None
        ]
        if config.keep_updates:
            given.append("--keep-updates")
        if config.max_staleness != 10:
            given.append("--max-staleness")
        if given:
            raise CoordinatorConfigError(
                f"{', '.join(given)} belong to the asynchronous strategy (--strategy fedbuff), "
                f"not to {config.strategy}"
            )
        return
    synchronous = [
        option
        for option, value, default in (
            ("--fraction", config.fraction, 1.0),
            ("--fraction-evaluate", config.fraction_evaluate, 0.0),
            ("--over-selection", config.over_selection, 1.0),
            ("--min-reports", config.min_reports, 1),
        )
        if value != default
    ]
    if synchronous:
        raise CoordinatorConfigError(
            f"{', '.join(synchronous)} belong to synchronous rounds; fedbuff keeps --concurrency "
            "devices training and judges each version on the server"
        )
    if config.fedbuff_concurrency < 1:
        raise CoordinatorConfigError(
            f"--concurrency must be at least 1, got {config.fedbuff_concurrency}"
        )
    if config.fedbuff_buffer < 1:
        raise CoordinatorConfigError(f"--buffer must be at least 1, got {config.fedbuff_buffer}")
    if config.max_staleness < 0:
        raise CoordinatorConfigError(
            f"--max-staleness must not be negative, got {config.max_staleness}"
        )
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise CoordinatorConfigError(
            f"--target-accuracy must lie in (0, 1], got {config.target_accuracy}"
        )
