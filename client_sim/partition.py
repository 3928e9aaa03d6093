"""Split a training set across simulated devices with flwr-datasets' partitioners.

A partition spec is text, as typed on the command line:

* ``iid``: every example used, shuffled (seeded) and cut into near-equal parts
  (``IidPartitioner``);
* ``dirichlet:ALPHA``: per class, proportions drawn from Dirichlet(ALPHA) over devices
  (``DirichletPartitioner``, self-balancing); small ALPHA (e.g. 0.1) means strong label skew,
  large ALPHA (e.g. 100) is close to iid;
* ``shards:K``: data sorted by label, cut into ``num_devices * K`` equal shards, K random shards
  per device (``ShardPartitioner``, the FedAvg paper's pathological non-iid split).

The labels go into a Hugging Face ``datasets.Dataset`` with an ``index`` column; each partition's
``index`` column gives the example indices for that device. Rows are put in a seeded random order
first, because ``IidPartitioner`` cuts contiguous blocks without shuffling (on class-sorted data
it would otherwise hand each device one or two classes) and ``DirichletPartitioner`` splits each
class in row order. The same seed always gives the same partition.

What the partitioners guarantee:

* iid: every example goes to exactly one device; sizes differ by at most one.
* dirichlet: each example to at most one device (all of them are in fact used); every device gets
  at least ``min(10, max(1, n // (4 * num_devices)))`` examples, or :class:`ValueError` if
  flwr-datasets could not manage that in its 11 draws.
* shards: ``n - num_devices * K * (n // (num_devices * K))`` examples are left out; every device
  gets exactly ``K * (n // (num_devices * K))``. A shard is a run of label-sorted examples, so a
  device sees at most K labels only when each class size is a multiple of the shard size
  (e.g. class-balanced data); otherwise a shard can straddle a class boundary and a device can see
  up to ``2 * K`` labels (more if some class is smaller than a shard).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedcoreml.ios_bridge.errors import FedCoreMLError

__all__ = [
    "ACCEPTED_FORMS",
    "PartitionError",
    "PartitionSpec",
    "dirichlet_min_partition_size",
    "parse_partition_spec",
    "partition_indices",
]

ACCEPTED_FORMS = "'iid', 'dirichlet:ALPHA' (ALPHA > 0, e.g. dirichlet:0.5) or 'shards:K' (K >= 1)"


class PartitionError(FedCoreMLError):
    """A partition spec or request that cannot be met (names the accepted forms or the limit)."""


PartitionKind = Literal["iid", "dirichlet", "shards"]


@dataclass(frozen=True)
class PartitionSpec:
    """How to split examples across devices: ``kind`` plus its one parameter."""

    kind: PartitionKind
    alpha: float | None = None
    shards_per_device: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid":
            if self.alpha is not None or self.shards_per_device is not None:
                raise PartitionError("an iid partition takes no parameters")
        elif self.kind == "dirichlet":
            if self.alpha is None or not np.isfinite(self.alpha) or self.alpha <= 0:
                raise PartitionError(f"dirichlet needs a finite ALPHA > 0, got {self.alpha}")
            if self.shards_per_device is not None:
                raise PartitionError("a dirichlet partition takes no shard count")
        elif self.kind == "shards":
            if self.shards_per_device is None or self.shards_per_device < 1:
                raise PartitionError(f"shards needs K >= 1, got {self.shards_per_device}")
            if self.alpha is not None:
                raise PartitionError("a shards partition takes no alpha")
        else:
            raise PartitionError(
                f"unknown partition kind {self.kind!r}; accepted: {ACCEPTED_FORMS}"
            )

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards_per_device}"
        return "iid"


def parse_partition_spec(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K`` (case and surrounding spaces ignored)."""
    raw = text
    text = text.strip().lower()
    kind, sep, arg = text.partition(":")
    kind, arg = kind.strip(), arg.strip()

    def bad(reason: str = "") -> PartitionError:
        extra = f" ({reason})" if reason else ""
        return PartitionError(f"bad partition spec {raw!r}{extra}; accepted: {ACCEPTED_FORMS}")

    if kind == "iid":
        if sep:
            raise bad("iid takes no parameter")
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise bad("ALPHA must be a number") from None
        if not np.isfinite(alpha) or alpha <= 0:
            raise bad("ALPHA must be a finite number > 0")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "shards":
        try:
            shards = int(arg)
        except ValueError:
            raise bad("K must be a whole number") from None
        if shards < 1:
            raise bad("K must be at least 1")
        return PartitionSpec("shards", shards_per_device=shards)
    raise bad()


def dirichlet_min_partition_size(num_examples: int, num_devices: int) -> int:
    """Smallest device the Dirichlet split accepts: ``min(10, max(1, n // (4 * devices)))``.

    A quarter of the average leaves the sampler room; asking for the full average (or close to
    it) makes flwr-datasets' retry loop fail almost always.
    """
    return min(10, max(1, num_examples // (4 * num_devices)))


def partition_indices(
    labels: np.ndarray,
    num_devices: int,
    spec: PartitionSpec | str,
    seed: int = 0,
) -> list[np.ndarray]:
    """Example indices (int64) for each of ``num_devices`` devices, per ``spec``.

    ``labels`` are the training labels ``[N]``. Each example goes to at most one device (for iid,
    to exactly one). Indices come in a random order within each device. Deterministic for a given
    ``seed``.
    """
    import datasets  # slow to import; only needed here
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    if isinstance(spec, str):
        spec = parse_partition_spec(spec)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be one-dimensional [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {labels.dtype}")
    n = int(labels.shape[0])
    if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer):
        raise PartitionError(f"num_devices must be an integer, got {num_devices!r}")
    num_devices = int(num_devices)
    if num_devices < 1:
        raise PartitionError(f"num_devices must be at least 1, got {num_devices}")
    if num_devices > n:
        raise PartitionError(f"cannot split {n} examples across {num_devices} devices")

    seed = int(seed)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    table = datasets.Dataset.from_dict({"label": labels[order].astype(np.int64), "index": order})

    partitioner: Partitioner
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_devices)
    elif spec.kind == "dirichlet":
        assert spec.alpha is not None
        min_size = dirichlet_min_partition_size(n, num_devices)
        partitioner = DirichletPartitioner(
            num_partitions=num_devices,
            partition_by="label",
            alpha=float(spec.alpha),
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    else:
        assert spec.shards_per_device is not None
        k = spec.shards_per_device
        if num_devices * k > n:
            raise PartitionError(
                f"shards:{k} across {num_devices} devices needs {num_devices * k} shards "
                f"but there are only {n} examples; use fewer devices or a smaller K"
            )
        partitioner = ShardPartitioner(
            num_partitions=num_devices,
            partition_by="label",
            num_shards_per_partition=k,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table

    parts: list[np.ndarray] = []
    with warnings.catch_warnings():
        # DirichletPartitioner warns on every failed draw; the final failure is a ValueError,
        # handled below. Dataset.sort (ShardPartitioner) triggers a pyarrow FutureWarning.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            for device in range(num_devices):
                part = partitioner.load_partition(device)
                index = part.with_format("numpy", columns=["index"])[:]["index"]
                parts.append(np.asarray(index, dtype=np.int64))
        except ValueError as exc:
            if spec.kind == "dirichlet":
                raise PartitionError(
                    f"{spec} across {num_devices} devices ({n} examples, seed {seed}): "
                    f"flwr-datasets could not give every device at least "
                    f"{dirichlet_min_partition_size(n, num_devices)} examples ({exc}); "
                    "use a larger ALPHA, fewer devices or more data"
                ) from exc
            raise PartitionError(
                f"{spec} across {num_devices} devices ({n} examples): {exc}"
            ) from exc
    return parts
