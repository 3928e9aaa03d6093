"""Flower's Message-API strategies by name, configured for a device fleet.

fedcoreml does not re-implement aggregation: every name maps to a strategy from
``flwr.serverapp.strategy`` (the DP names wrap FedAvg in Flower's server-side clipping); the
FedAvg family may be the variant that folds its mean as updates arrive (mean_on_arrival.py).
Options given as text are typed and checked against the strategy's constructor
(strategy_options.py) before any device is contacted.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedcoreml.server.fedbuff import FedBuff
from fedcoreml.server.mean_on_arrival import ON_ARRIVAL
from fedcoreml.server.strategy_options import (
    ConstructorOptions,
    StrategyError,
    split_options,
    typed_options,
)

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
DP_WRAPPERS = {
    "dp-fixed": DifferentialPrivacyServerSideFixedClipping,
    "dp-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
}
STRATEGY_NAMES = (*STRATEGIES, *DP_WRAPPERS, "fedbuff")

FEDPROX_REFUSAL = (
    "FedProx is not offered: its proximal term is added to each client's training loss, and "
    "Core ML's MLUpdateTask trains with the model's own loss only, so an iPhone cannot apply it. "
    "Use fedavg (FedProx with mu = 0), or a server-side strategy such as fedavgm or fedadam."
)


__all__ = [
    "STRATEGIES",
    "STRATEGY_NAMES",
    "StrategyError",
    "check_strategy_options",
    "make_strategy",
    "parse_strategy_args",
]

# Set from fedcoreml's own options (--fraction, --min-devices ...) or fixed by its messages.
SET_BY_FEDCOREML = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
)
SET_BY_FEDCOREML_DP = ("strategy", "num_sampled_clients")
# fedbuff's options that have command-line flags of their own (--concurrency, --buffer ...).
SET_BY_FEDCOREML_FEDBUFF = (
    "concurrency",
    "buffer_size",
    "max_staleness",
    "min_available_nodes",
    "poll_interval_s",
)


def _resolve(name: str) -> tuple[str, type[Strategy], type[Strategy] | None]:
    """(lower-case name, Flower strategy class, DP wrapper class or None) for a strategy name."""
    key = name.lower()
    if key == "fedbuff":
        return key, FedBuff, None
    if key == "fedprox":
        raise StrategyError(FEDPROX_REFUSAL)
    if key in DP_WRAPPERS:
        return key, FedAvg, DP_WRAPPERS[key]
    if key not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return key, STRATEGIES[key], None


def check_strategy_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options typed for the named strategy's constructor (and its DP wrapper's)."""
    key, base, wrapper = _resolve(name)
    fixed = SET_BY_FEDCOREML_FEDBUFF if base is FedBuff else SET_BY_FEDCOREML
    base_parameters = ConstructorOptions(base, fixed)
    if wrapper is None:
        return typed_options(key, options, base_parameters)
    wrapper_parameters = ConstructorOptions(wrapper, SET_BY_FEDCOREML_DP)
    own = {k: v for k, v in options.items() if k in wrapper_parameters}
    rest = {k: v for k, v in options.items() if k not in wrapper_parameters}
    return {
        **typed_options(key, own, wrapper_parameters),
        **typed_options(key, rest, base_parameters),
    }


def parse_strategy_args(items: list[str], strategy: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs converted to the types the strategy's constructor takes."""
    return check_strategy_options(strategy, split_options(items))


def make_strategy(
    name: str,
    *,
    fraction_train: float,
    fraction_evaluate: float,
    min_devices: int,
    options: dict[str, Any] | None = None,
    fold_on_arrival: bool = False,
    asynchronous: dict[str, int] | None = None,
) -> Strategy | FedBuff:
    """A Flower strategy that samples ``fraction_train`` of at least ``min_devices`` devices.

    With ``fold_on_arrival``, FedAvg and the optimisers built on its mean fold each update into
    the round's mean as it arrives (on a grid that feeds them, see mean_on_arrival.py); the other
    strategies need every update and are Flower's own whatever it says. ``fedbuff`` is
    asynchronous (fedbuff.py): ``asynchronous`` gives its ``concurrency``, ``buffer_size`` and
    ``max_staleness``.
    """
    key, base, wrapper = _resolve(name)
    options = check_strategy_options(key, options or {})
    if base is FedBuff:
        try:
            return FedBuff(**(asynchronous or {}), min_available_nodes=min_devices, **options)
        except ValueError as exc:
            raise StrategyError(f"strategy fedbuff: {exc}") from None
    dp_options = {}
    if wrapper is not None:
        dp_parameters = ConstructorOptions(wrapper, SET_BY_FEDCOREML_DP)
        dp_options = {k: options.pop(k) for k in list(options) if k in dp_parameters}
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": max(1, min(min_devices, round(min_devices * fraction_train) or 1)),
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        "min_available_nodes": min_devices,
    }
    # DP clipping needs every update: its wrapped FedAvg stays Flower's own.
    chosen = ON_ARRIVAL.get(base, base) if fold_on_arrival and wrapper is None else base
    try:
        strategy = chosen(**common, **options)
        if wrapper is not None:
            dp_options.setdefault("noise_multiplier", 0.0)
            if key == "dp-fixed":
                dp_options.setdefault("clipping_norm", 10.0)
            num_sampled = max(common["min_train_nodes"], round(min_devices * fraction_train))
            strategy = wrapper(strategy, num_sampled_clients=num_sampled, **dp_options)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {key}: {exc}") from None
    return strategy
