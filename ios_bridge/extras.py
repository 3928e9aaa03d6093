"""Optional parts of the install: a command that needs one says which extra to install.

``pip install fedcoreml`` gives the coordinator, ``model`` and ``tokens``; the simulated devices
(``devices``, ``train``, ``demo``) train with TensorFlow and partition with flwr-datasets, which
come with ``pip install "fedcoreml[devices]"``. The check looks the modules up without importing
them, so it costs nothing when they are there.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from fedcoreml.ios_bridge.errors import FedCoreMLError

DEVICES_EXTRA = "devices"
DEVICES_MODULES = ("tensorflow", "flwr_datasets")


class MissingExtraError(FedCoreMLError):
    """A command needs an optional part of the install that is not there."""


def require_extra(extra: str, modules: Iterable[str]) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` unless every one of ``modules`` exists."""
    if any(importlib.util.find_spec(module) is None for module in modules):
        raise MissingExtraError(f'needs the {extra} extra: pip install "fedcoreml[{extra}]"')


def require_devices_extra(modules: Iterable[str] = DEVICES_MODULES) -> None:
    """The simulated devices' dependencies (TensorFlow, flwr-datasets), or one clear error."""
    require_extra(DEVICES_EXTRA, modules)
