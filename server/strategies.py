"""Flower's Message-API strategies by name, configured for a device fleet.

fedcoreml does not re-implement aggregation: every name maps to a strategy from
``flwr.serverapp.strategy`` (the DP names wrap FedAvg in Flower's server-side clipping).
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

from fedcoreml.ios_bridge.errors import FedCoreMLError

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
# Strategies whose aggregation begins with FedAvg's examples-weighted mean of the replies (they
# subclass FedAvg and call its aggregate_train first): DeviceGrid may average updates as they
# arrive and hand them one reply holding the mean. The others need every update (median,
# trimmed mean, Krum, per-update clipping) and are handed every reply.
AVERAGE_FIRST = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"})
DP_WRAPPERS = {
    "dp-fixed": DifferentialPrivacyServerSideFixedClipping,
    "dp-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
}
STRATEGY_NAMES = (*STRATEGIES, *DP_WRAPPERS)
DP_OPTION_NAMES = (
    "noise_multiplier",
    "clipping_norm",
    "initial_clipping_norm",
    "target_clipped_quantile",
    "clip_norm_lr",
    "clipped_count_stddev",
)

FEDPROX_REFUSAL = (
    "FedProx is not offered: its proximal term is added to each client's training loss, and "
    "Core ML's MLUpdateTask trains with the model's own loss only, so an iPhone cannot apply it. "
    "Use fedavg (FedProx with mu = 0), or a server-side strategy such as fedavgm or fedadam."
)


class StrategyError(FedCoreMLError):
    """An unknown strategy, or options it does not take."""


def parse_strategy_args(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs (numbers become int or float) for the strategy's constructor."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StrategyError(f"strategy option {item!r} is not KEY=VALUE")
        value: Any = raw
        for convert in (int, float):
            try:
                value = convert(raw)
                break
            except ValueError:
                continue
        options[key.replace("-", "_")] = value
    return options


def averages_first(name: str) -> bool:
    """Whether the named strategy only ever sees the weighted mean of the updates."""
    return name.lower() in AVERAGE_FIRST


def make_strategy(
    name: str,
    *,
    fraction_train: float,
    fraction_evaluate: float,
    min_devices: int,
    options: dict[str, Any] | None = None,
) -> Strategy:
    """A Flower strategy that samples ``fraction_train`` of at least ``min_devices`` devices."""
    key = name.lower()
    options = dict(options or {})
    if key == "fedprox":
        raise StrategyError(FEDPROX_REFUSAL)
    base_name = "fedavg" if key in DP_WRAPPERS else key
    if base_name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    dp_options = {}
    if key in DP_WRAPPERS:
        for dp_key in DP_OPTION_NAMES:
            if dp_key in options:
                dp_options[dp_key] = options.pop(dp_key)
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": max(1, min(min_devices, round(min_devices * fraction_train) or 1)),
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        "min_available_nodes": min_devices,
    }
    try:
        strategy = STRATEGIES[base_name](**common, **options)
        if key in DP_WRAPPERS:
            dp_options.setdefault("noise_multiplier", 0.0)
            if key == "dp-fixed":
                dp_options.setdefault("clipping_norm", 10.0)
            num_sampled = max(common["min_train_nodes"], round(min_devices * fraction_train))
            strategy = DP_WRAPPERS[key](strategy, num_sampled_clients=num_sampled, **dp_options)
    except TypeError as exc:
        raise StrategyError(f"strategy {name!r}: {exc}") from None
    return strategy
