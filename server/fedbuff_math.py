"""FedBuff's arithmetic as pure functions: staleness discounts, a buffer's mean delta, server steps.

FedBuff (Nguyen et al., AISTATS 2022) treats each device update as a delta against the model
version it was trained on, buffers K of them, and applies their mean, each weighted by its
examples and discounted by its staleness s (versions published since its base), as one server
step. The server steps are Flower's own maths, expression for expression, applied to the
"aggregate" ``current + mean delta``: plain (FedAvg, server learning rate 1), SGD with a server
learning rate and momentum (:class:`flwr.serverapp.strategy.FedAvgM`), and Adam
(:class:`flwr.serverapp.strategy.FedAdam`); tests/test_fedbuff_math.py shows they are bit for
bit what Flower's classes return. Every function is deterministic for a given order of inputs,
which is what makes a recorded run replayable bit for bit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

Arrays = dict[str, np.ndarray]

SERVER_OPTIMIZERS = ("sgd", "adam")


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """The discount of an update ``staleness`` versions old: 1 / (1 + s) ** exponent.

    The default exponent 0.5 is FedBuff's 1/√(1+s); 0 weighs every update alike.
    """
    if staleness < 0:
        raise ValueError(f"staleness must not be negative, got {staleness}")
    return 1.0 / (1.0 + staleness) ** exponent


@dataclass(frozen=True)
class BufferedUpdate:
    """One accepted update waiting in the buffer: its delta and what it is weighted by."""

    device: str  # who sent it (for the record; never used in the maths)
    base_version: int  # the version it was trained on
    staleness: int  # versions published between its base and its arrival
    num_examples: int
    weight: float  # num_examples * staleness_weight(staleness)
    delta: Arrays = field(repr=False)  # trained - base, per parameter, float32


def buffer_mean(updates: Sequence[BufferedUpdate]) -> Arrays:
    """The weighted mean of the updates' deltas, summed in float64 in the order given."""
    if not updates:
        raise ValueError("an empty buffer has no mean")
    total = math.fsum(u.weight for u in updates)
    if not total > 0:
        raise ValueError(f"the buffer's weights sum to {total}; nothing to average")
    names = list(updates[0].delta)
    mean = {}
    for name in names:
        acc = np.zeros(updates[0].delta[name].shape, dtype=np.float64)
        for update in updates:
            acc += update.weight * update.delta[name].astype(np.float64)
        mean[name] = (acc / total).astype(np.float32)
    return mean


@dataclass(frozen=True)
class ServerOptimizer:
    """How a buffer's mean delta moves the model (Flower's FedAvgM / FedAdam parameters)."""

    kind: str = "sgd"  # "sgd" (FedAvgM's step, plain FedAvg at lr 1 without momentum) or "adam"
    learning_rate: float = 1.0  # FedAvgM's server_learning_rate, FedAdam's eta
    momentum: float = 0.0  # FedAvgM's server_momentum (sgd only)
    beta_1: float = 0.9  # FedAdam's
    beta_2: float = 0.99
    tau: float = 1e-9

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server optimizer {self.kind!r}: choose one of {', '.join(SERVER_OPTIMIZERS)}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"server learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server momentum must lie in [0, 1), got {self.momentum}")
        if self.kind == "sgd" and (self.beta_1, self.beta_2, self.tau) != (0.9, 0.99, 1e-9):
            raise ValueError("beta_1, beta_2 and tau belong to the adam server optimizer")
        if self.kind == "adam" and self.momentum:
            raise ValueError("server momentum belongs to the sgd server optimizer; adam has beta_1")

    @property
    def stateful(self) -> bool:
        return self.kind == "adam" or self.momentum > 0


@dataclass(frozen=True)
class ServerState:
    """What a stateful server step carries from one version to the next."""

    steps: int = 0  # server steps applied so far (FedAdam's round number for its bias correction)
    momentum: Arrays | None = None  # FedAvgM's momentum vector
    m: Arrays | None = None  # FedAdam's first moment
    v: Arrays | None = None  # FedAdam's second moment

    def to_bytes(self) -> bytes:
        """An .npz of the state (for the run directory, so a resumed run steps on exactly)."""
        arrays: dict[str, np.ndarray] = {"steps": np.int64(self.steps)}
        for group in ("momentum", "m", "v"):
            for name, value in (getattr(self, group) or {}).items():
                arrays[f"{group}/{name}"] = value
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerState:
        with np.load(io.BytesIO(data)) as stored:
            groups: dict[str, Arrays] = {}
            for key in stored.files:
                if key == "steps":
                    continue
                group, _, name = key.partition("/")
                groups.setdefault(group, {})[name] = stored[key]
            return cls(
                int(stored["steps"]), groups.get("momentum"), groups.get("m"), groups.get("v")
            )


def server_step(
    current: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    optimizer: ServerOptimizer,
    state: ServerState,
) -> tuple[Arrays, ServerState]:
    """The next model and server state: ``optimizer``'s step towards ``current + mean_delta``."""
    if set(current) != set(mean_delta):
        raise ValueError(
            f"the buffer's deltas name {sorted(mean_delta)} but the model has {sorted(current)}"
        )
    aggregated = {k: (current[k] + mean_delta[k]).astype(current[k].dtype) for k in current}
    steps = state.steps + 1
    if optimizer.kind == "adam":
        return _adam(current, aggregated, optimizer, state, steps)
    if optimizer.learning_rate == 1.0 and optimizer.momentum == 0.0:
        return aggregated, replace(state, steps=steps)  # FedAvg: the aggregate itself
    # FedAvgM.aggregate_train: pseudo-gradient, momentum, SGD
    pseudo_gradient = {k: current[k] - aggregated[k] for k in current}
    momentum = None
    if optimizer.momentum > 0.0:
        if state.momentum is None:
            momentum = pseudo_gradient
        else:
            momentum = {
                k: optimizer.momentum * state.momentum[k] + pseudo_gradient[k] for k in current
            }
        pseudo_gradient = momentum
    new = {
        k: np.asarray(current[k] - optimizer.learning_rate * pseudo_gradient[k]) for k in current
    }
    return new, ServerState(steps, momentum=momentum)


def _adam(
    current: Mapping[str, np.ndarray],
    aggregated: Arrays,
    optimizer: ServerOptimizer,
    state: ServerState,
    steps: int,
) -> tuple[Arrays, ServerState]:
    """FedOpt._compute_deltat_and_mt and FedAdam.aggregate_train, at server round ``steps``."""
    delta_t = {k: x - current[k] for k, x in aggregated.items()}
    m = state.m or {k: np.zeros_like(v) for k, v in aggregated.items()}
    m = {k: optimizer.beta_1 * v + (1 - optimizer.beta_1) * delta_t[k] for k, v in m.items()}
    v = state.v or {k: np.zeros_like(x) for k, x in aggregated.items()}
    v = {k: optimizer.beta_2 * x + (1 - optimizer.beta_2) * (delta_t[k] ** 2) for k, x in v.items()}
    eta_norm = (
        optimizer.learning_rate
        * np.sqrt(1 - np.power(optimizer.beta_2, steps + 1.0))
        / (1 - np.power(optimizer.beta_1, steps + 1.0))
    )
    new = {
        k: np.asarray(x + eta_norm * m[k] / (np.sqrt(v[k]) + optimizer.tau))
        for k, x in current.items()
    }
    return new, ServerState(steps, m=m, v=v)
