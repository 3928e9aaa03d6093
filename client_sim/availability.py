"""Availability profiles: when a simulated device charges, is on Wi-Fi, and how full its battery is.

A phone is not always eligible for federated work: it charges for a while (overnight, at a desk)
and then not, moves between unmetered Wi-Fi and a metered cellular network, and its battery
drains and fills. :class:`AvailabilityProfile` models that per device, seeded, as a function of
``t`` (seconds since the fleet started): charging and unmetered periods alternate, each period a
random length, so that on average ``charging_share`` of the devices charge at any time; the
battery changes linearly (up while charging, down otherwise) and is clipped to [0, 1].

Presets (:data:`PRESETS`), sized for runs that last minutes, not days:

* ``always`` -- charging, unmetered, battery full, all the time (the default; what simulated
  devices reported before profiles existed).
* ``phones`` -- ~40 % charging at a time, charging windows of 30-120 s; ~70 % on unmetered
  networks, network periods of 60-300 s; the battery drains 0.5 %/s off the charger and fills
  1 %/s on it, starting between 20 % and 100 %.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.wire import device_pb2

__all__ = ["PRESETS", "AvailabilityError", "AvailabilityProfile", "preset"]


class AvailabilityError(FedCoreMLError):
    """An availability profile that cannot be built as asked (unknown preset, bad share)."""


@dataclass(frozen=True)
class AvailabilityProfile:
    """One device's availability over time; the same ``seed`` gives the same timeline.

    ``charging_share`` of the time is spent charging, in windows of ``charging_window`` seconds
    (uniformly drawn); the gaps between them are drawn so that the share holds on average.
    Likewise ``unmetered_share`` and ``network_window`` for an unmetered network. The battery
    starts uniformly in ``initial_battery`` and moves ``charge_per_second`` up while charging,
    ``drain_per_second`` down otherwise.
    """

    name: str
    charging_share: float
    charging_window: tuple[float, float]
    unmetered_share: float
    network_window: tuple[float, float]
    drain_per_second: float
    charge_per_second: float
    initial_battery: tuple[float, float]
    seed: int | str = 0

    def __post_init__(self) -> None:
        for label, share in (("charging_share", self.charging_share),
                             ("unmetered_share", self.unmetered_share)):  # fmt: skip
            if not 0.0 <= share <= 1.0:
                raise AvailabilityError(f"{label} must lie in [0, 1], got {share}")
        for label, (low, high) in (("charging_window", self.charging_window),
                                   ("network_window", self.network_window)):  # fmt: skip
            if not 0.0 < low <= high:
                raise AvailabilityError(f"{label} must be 0 < low <= high, got ({low}, {high})")
        low, high = self.initial_battery
        if not 0.0 <= low <= high <= 1.0:
            raise AvailabilityError(
                f"initial_battery must be 0 <= low <= high <= 1, got {low, high}"
            )
        if self.drain_per_second < 0 or self.charge_per_second < 0:
            raise AvailabilityError("drain_per_second and charge_per_second must be >= 0")

    def for_device(self, seed: int | str) -> AvailabilityProfile:
        """This profile with another seed (one per device)."""
        return replace(self, seed=seed)

    def charging(self, t: float) -> bool:
        """Whether the device is charging ``t`` seconds after the start."""
        return _on_at(self._periods("charging", self.charging_share, self.charging_window), t)

    def unmetered(self, t: float) -> bool:
        """Whether the device is on an unmetered network ``t`` seconds after the start."""
        return _on_at(self._periods("network", self.unmetered_share, self.network_window), t)

    def battery(self, t: float) -> float:
        """The battery level in [0, 1] ``t`` seconds after the start."""
        level = random.Random(f"{self.seed}:battery").uniform(*self.initial_battery)
        for start, end, on in self._periods("charging", self.charging_share, self.charging_window):
            if start >= t:
                break
            span = min(end, t) - start
            rate = self.charge_per_second if on else -self.drain_per_second
            level = min(1.0, max(0.0, level + rate * span))
        return level

    def capabilities(self, t: float) -> device_pb2.DeviceCapabilities:
        """What the device reports ``t`` seconds after the start."""
        return device_pb2.DeviceCapabilities(
            charging=self.charging(t),
            unmetered_network=self.unmetered(t),
            battery_level=self.battery(t),
        )

    def provider(
        self, clock: Callable[[], float] = time.monotonic, start: float | None = None
    ) -> Callable[[], device_pb2.DeviceCapabilities]:
        """A capabilities provider for :class:`DeviceClient`; time counts from ``start`` (now)."""
        origin = clock() if start is None else start
        return lambda: self.capabilities(clock() - origin)

    def _periods(
        self, purpose: str, share: float, window: tuple[float, float]
    ) -> Iterator[tuple[float, float, bool]]:
        """Alternating (start, end, on) periods from t = 0 on, endless, seeded."""
        if share >= 1.0 or share <= 0.0:
            yield 0.0, float("inf"), share >= 1.0
            return
        rng = random.Random(f"{self.seed}:{purpose}")
        gap_scale = (1.0 - share) / share  # off periods, on average, this many times on periods
        on = rng.random() < share
        # Start somewhere inside the first period, so that devices do not switch in step.
        length = rng.uniform(*window) * (1.0 if on else gap_scale)
        start = -rng.uniform(0.0, length)
        while True:
            end = start + length
            yield max(start, 0.0), end, on
            start, on = end, not on
            length = rng.uniform(*window) * (1.0 if on else gap_scale)


def _on_at(periods: Iterator[tuple[float, float, bool]], t: float) -> bool:
    for _, end, on in periods:
        if t < end:
            return on
    raise AssertionError("periods are endless")  # pragma: no cover


PRESETS: dict[str, AvailabilityProfile] = {
    "always": AvailabilityProfile(
        name="always",
        charging_share=1.0,
        charging_window=(1.0, 1.0),
        unmetered_share=1.0,
        network_window=(1.0, 1.0),
        drain_per_second=0.0,
        charge_per_second=0.0,
        initial_battery=(1.0, 1.0),
    ),
    "phones": AvailabilityProfile(
        name="phones",
        charging_share=0.4,
        charging_window=(30.0, 120.0),
        unmetered_share=0.7,
        network_window=(60.0, 300.0),
        drain_per_second=0.005,
        charge_per_second=0.01,
        initial_battery=(0.2, 1.0),
    ),
}


def preset(name: str, seed: int | str = 0) -> AvailabilityProfile:
    """The preset called ``name``, seeded with ``seed``; AvailabilityError if there is none."""
    try:
        return PRESETS[name].for_device(seed)
    except KeyError:
        raise AvailabilityError(
            f"unknown availability profile {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
