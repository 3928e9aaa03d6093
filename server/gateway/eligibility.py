"""Which devices may be given work: the rule set by --require-charging, --require-unmetered and
--min-battery, applied to the capabilities a device last reported (Register, every GetTask)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class _CapabilitiesMessage(Protocol):
    charging: bool
    unmetered_network: bool
    battery_level: float


@dataclass(frozen=True)
class Capabilities:
    """What a device said about itself; ``battery_level`` in [0, 1], or None when unknown."""

    charging: bool
    unmetered_network: bool
    battery_level: float | None

    @classmethod
    def of(cls, message: _CapabilitiesMessage) -> Capabilities:
        """From a ``DeviceCapabilities`` message (a negative or non-finite level is unknown).

        The level travels as a float32: rounded to 6 places, 0.7 is 0.7 again, not 0.69999999.
        """
        level = float(message.battery_level)
        known = math.isfinite(level) and 0.0 <= level <= 1.0
        level = round(level, 6) if known else None
        return cls(bool(message.charging), bool(message.unmetered_network), level)


@dataclass(frozen=True)
class EligibilityRule:
    """The conditions a device must meet to be sampled and handed a task (none by default)."""

    require_charging: bool = False
    require_unmetered: bool = False
    min_battery: float | None = None  # in [0, 1]

    def __post_init__(self) -> None:
        if self.min_battery is not None and not 0.0 <= self.min_battery <= 1.0:
            raise ValueError(f"min_battery must lie in [0, 1], got {self.min_battery}")

    @property
    def requires_anything(self) -> bool:
        return self.require_charging or self.require_unmetered or self.min_battery is not None

    def check(self, capabilities: Capabilities | None) -> str | None:
        """None when eligible, else one line naming everything missing.

        ``capabilities`` None: the device did not report any (ineligible if anything is required).
        """
        if not self.requires_anything:
            return None
        if capabilities is None:
            return "not eligible: capabilities not reported"
        missing = []
        if self.require_charging and not capabilities.charging:
            missing.append("not charging")
        if self.require_unmetered and not capabilities.unmetered_network:
            missing.append("not on an unmetered network")
        if self.min_battery is not None:
            level = capabilities.battery_level
            if level is None:
                missing.append("battery level unknown")
            elif level < self.min_battery:
                missing.append(f"battery {level:.2f} below {self.min_battery:.2f}")
        return f"not eligible: {', '.join(missing)}" if missing else None
