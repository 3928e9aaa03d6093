"""A fleet of simulated iPhones: N devices, each with its own slice of a data set, in threads.

:func:`partition_dataset` splits a training set across devices with
:func:`~fedcoreml.client_sim.partition.partition_indices` and keeps 10% of each device's share
aside (seeded) as its held-out split for evaluate tasks. :func:`run_fleet` runs one
:class:`~fedcoreml.client_sim.device.SimulatedDevice` per share in its own thread, each on its
own gRPC channel to the coordinator, and returns their stats once all have finished (or the stop
event was set). :func:`pick_devices` chooses which devices drop out or straggle.

With ``FleetOptions.ca_cert`` the channels use TLS and trust that CA; with
``FleetOptions.tokens`` (device id -> bearer token, as a token file holds them) each device
authenticates with its own token.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcoreml.client_sim.availability import preset
from fedcoreml.client_sim.device import (
    DeviceData,
    DeviceStats,
    Poison,
    RetryPolicy,
    SimulatedDevice,
)
from fedcoreml.client_sim.partition import PartitionSpec, partition_indices
from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.datasets import Dataset
from fedcoreml.ios_bridge.device_client import DeviceClientError
from fedcoreml.ios_bridge.errors import FedCoreMLError

__all__ = [
    "FleetError",
    "FleetOptions",
    "device_seed",
    "partition_dataset",
    "pick_devices",
    "run_fleet",
    "split_holdout",
]

log = logging.getLogger("fedcoreml.device")

_JOIN_POLL_SECONDS = 0.2


class FleetError(FedCoreMLError):
    """A fleet that cannot be built as asked (too little data, a bad fraction)."""


def split_holdout(x: np.ndarray, y: np.ndarray, fraction: float = 0.1, seed: int = 0) -> DeviceData:
    """Split one device's examples into training and held-out parts (seeded, random order).

    The held-out part is ``round(fraction * n)`` examples, but at least one, and at least one
    example is left for training, so a device needs two or more examples.
    """
    n = len(y)
    if n < 2:
        raise FleetError(f"a device needs at least 2 examples (train + held-out), got {n}")
    if not 0.0 < fraction < 1.0:
        raise FleetError(f"the held-out fraction must lie strictly in (0, 1), got {fraction}")
    held_out = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    train, held = order[held_out:], order[:held_out]
    return DeviceData(x_train=x[train], y_train=y[train], x_eval=x[held], y_eval=y[held])


def device_seed(seed: int, index: int) -> int:
    """The seed of device ``index`` in a fleet seeded with ``seed``."""
    return seed * 1_000_003 + index


def partition_dataset(
    dataset: Dataset,
    count: int,
    partition: PartitionSpec | str = "iid",
    seed: int = 0,
    holdout_fraction: float = 0.1,
) -> list[DeviceData]:
    """Each of ``count`` devices' data: its partition of the training set, split for held-out."""
    parts = partition_indices(dataset.y_train, count, partition, seed)
    result = []
    for index, part in enumerate(parts):
        if len(part) < 2:
            raise FleetError(
                f"device {index} got {len(part)} example(s) from the {partition} partition; "
                "each needs at least 2 (use fewer devices, more data or another partition)"
            )
        x, y = dataset.x_train[part], dataset.y_train[part]
        result.append(split_holdout(x, y, holdout_fraction, device_seed(seed, index)))
    return result


def pick_devices(count: int, fraction: float, seed: int = 0, purpose: str = "") -> frozenset[int]:
    """``round(fraction * count)`` device indices, chosen at random (seeded by seed and purpose).

    Different ``purpose`` strings ("drop", "slow") give independent choices for the same seed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise FleetError(f"a fraction of devices must lie in [0, 1], got {fraction}")
    k = round(fraction * count)
    rng = np.random.default_rng([seed, zlib.crc32(purpose.encode())])
    return frozenset(int(i) for i in rng.choice(count, size=k, replace=False))


@dataclass(frozen=True)
class FleetOptions:
    """How the devices of a fleet behave.

    ``drop_devices`` drop out with ``drop_probability`` per task (after downloading a model);
    ``slow_devices`` sleep ``slowdown_seconds`` before each submission and train
    ``slowdown_factor`` times as long. At most
    ``max_concurrent_training`` devices train or evaluate at once. ``ca_cert`` (a PEM file)
    switches the channels to TLS trusting that CA; ``tokens`` maps every device id to the
    bearer token it authenticates with (empty: no authentication). ``availability`` names a
    preset of :mod:`~fedcoreml.client_sim.availability` (``always``, ``phones``): when each
    device charges, is on an unmetered network and how full its battery is.
    """

    seed: int = 0
    drop_devices: Collection[int] = frozenset()
    drop_probability: float = 1.0
    # Each round, this fraction of the devices (a fresh seeded choice per round) vanish mid-task;
    # with rejoin_after_seconds they come back that much later as a relaunched app.
    drop_each_round: float = 0.0
    poison_devices: Collection[int] = frozenset()
    poison: str | None = None  # "scale:F" or "random", for the poison_devices
    rejoin_after_seconds: float | None = None
    slow_devices: Collection[int] = frozenset()
    slowdown_seconds: float = 0.0
    slowdown_factor: float = 1.0  # slow devices train this many times as long
    max_concurrent_training: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    device_id_prefix: str = "sim"
    ca_cert: str | os.PathLike[str] | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)
    availability: str = "always"

    def device_id(self, index: int) -> str:
        return f"{self.device_id_prefix}-{index:03d}"


def _device_tokens(options: FleetOptions, count: int) -> list[str | None]:
    """Each device's token (None for all without ``options.tokens``); FleetError if one lacks."""
    ids = [options.device_id(index) for index in range(count)]
    if not options.tokens:
        return [None] * count
    missing = [device_id for device_id in ids if device_id not in options.tokens]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FleetError(f"no token for device(s) {', '.join(missing[:3])}{more}")
    return [options.tokens[device_id] for device_id in ids]


def run_fleet(
    address: str,
    data: Sequence[DeviceData],
    options: FleetOptions | None = None,
    stop: threading.Event | None = None,
) -> list[DeviceStats]:
    """Run one device per entry of ``data`` against the coordinator at ``address`` (HOST:PORT).

    Returns every device's stats, in order, once all have finished, dropped out, given up or
    been stopped. A device that gives up has ``stats.error`` set; the others go on.
    """
    options = options or FleetOptions()
    if options.max_concurrent_training < 1:
        raise FleetError(
            f"max_concurrent_training must be at least 1, got {options.max_concurrent_training}"
        )
    tokens = _device_tokens(options, len(data))
    preset(options.availability)  # an unknown name fails here, before any channel opens
    stop = stop if stop is not None else threading.Event()
    slots = threading.Semaphore(options.max_concurrent_training)
    channels = [open_channel(address, options.ca_cert) for _ in data]
    devices = [
        SimulatedDevice(
            channel,
            options.device_id(index),
            device_data,
            seed=device_seed(options.seed, index),
            training_slots=slots,
            stop=stop,
            retry=options.retry,
            drop_probability=options.drop_probability if index in options.drop_devices else 0.0,
            slowdown_seconds=options.slowdown_seconds if index in options.slow_devices else 0.0,
            slowdown_factor=options.slowdown_factor if index in options.slow_devices else 1.0,
            drops_in_round=_round_dropper(options, len(data), index),
            rejoin_after_seconds=options.rejoin_after_seconds,
            poison=(
                Poison.parse(options.poison, device_seed(options.seed, index))
                if options.poison and index in options.poison_devices
                else None
            ),
            availability=preset(options.availability, device_seed(options.seed, index)),
            token=token,
        )
        for index, (channel, device_data, token) in enumerate(
            zip(channels, data, tokens, strict=True)
        )
    ]
    threads = [
        threading.Thread(target=_run_device, args=(device,), name=device.device_id, daemon=True)
        for device in devices
    ]
    log.info(
        "starting %d simulated device(s) against %s (%s%s)",
        len(devices), address, "TLS" if options.ca_cert else "plaintext",
        ", with tokens" if options.tokens else "",
    )  # fmt: skip
    try:
        for thread in threads:
            thread.start()
        _join_all(threads)
    except BaseException:
        stop.set()  # e.g. Ctrl+C: let every device end promptly
        _join_all(threads)
        raise
    finally:
        for channel in channels:
            channel.close()
    return [device.stats for device in devices]


def tune_garbage_collection() -> None:
    """Collect cyclic garbage rarely in a fleet process.

    Every training task builds Keras/TensorFlow objects by the thousand, and with ten devices'
    models alive in one process the default thresholds run full collections often enough to
    cost ~10 % of the fleet's wall time (measured with bench/federated_overhead.py). Memory is
    still reclaimed: reference counting frees almost everything, and collections still run.
    """
    gc.set_threshold(200_000, 100, 100)


def _round_dropper(options: FleetOptions, count: int, index: int):
    """Whether device ``index`` vanishes in a given round, or None when nobody does."""
    if options.drop_each_round <= 0:
        return None

    def drops(round_number: int) -> bool:
        chosen = pick_devices(count, options.drop_each_round, options.seed, f"round-{round_number}")
        return index in chosen

    return drops


def _run_device(device: SimulatedDevice) -> None:
    try:
        device.run()
    except DeviceClientError:
        pass  # logged and recorded in device.stats.error by the device itself
    except Exception as exc:  # a bug: record it, and let the other devices go on
        log.exception("%s: crashed", device.device_id)
        device.stats.error = f"crashed: {exc!r}"


def _join_all(threads: Sequence[threading.Thread]) -> None:
    for thread in threads:
        while thread.is_alive():
            thread.join(_JOIN_POLL_SECONDS)
