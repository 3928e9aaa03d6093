"""Tests for fedcoreml.client_sim.partition (flwr-datasets partitioners behind a spec string)."""

from __future__ import annotations

import numpy as np
import pytest

from fedcoreml.client_sim.partition import (
    PartitionSpec,
    dirichlet_min_partition_size,
    parse_partition_spec,
    partition_indices,
)

NUM_CLASSES = 10
SORTED_LABELS = np.repeat(np.arange(NUM_CLASSES), 100)  # 1,000 examples, class-sorted


def label_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Per-device label distributions, rows summing to 1."""
    counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
    return counts / counts.sum(axis=1, keepdims=True)


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each device's labels and the global ones."""
    hist = label_histograms(labels, parts)
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(0.5 * np.abs(hist - overall).sum(axis=1).mean())


def assert_disjoint(parts: list[np.ndarray], n: int) -> np.ndarray:
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an example was given to two devices"
    assert joined.min() >= 0 and joined.max() < n
    return joined


# --------------------------------------------------------------------------------------------
# parse_partition_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("dirichlet:10", PartitionSpec("dirichlet", alpha=10.0)),
        ("shards:2", PartitionSpec("shards", shards_per_device=2)),
    ],
)
def test_parse_spec(text: str, expected: PartitionSpec) -> None:
    spec = parse_partition_spec(text)
    assert spec == expected
    assert parse_partition_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "random",
        "iid:3",
        "dirichlet",
        "dirichlet:",
        "dirichlet:abc",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:inf",
        "shards",
        "shards:0",
        "shards:1.5",
        "shards:two",
    ],
)
def test_parse_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_partition_spec(text)
    message = str(info.value)
    assert repr(text) in message
    for form in ("iid", "dirichlet:ALPHA", "shards:K"):
        assert form in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="accepted"):
        partition_indices(SORTED_LABELS, 10, "fedprox", seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        partition_indices(SORTED_LABELS, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="cannot split 5 examples across 6 devices"):
        partition_indices(np.arange(5), 6, "iid", seed=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        partition_indices(SORTED_LABELS.reshape(10, 100), 2, "iid", seed=0)
    with pytest.raises(ValueError, match="shards"):
        partition_indices(np.arange(10) % 2, 6, "shards:2", seed=0)


# --------------------------------------------------------------------------------------------
# iid


def test_iid_covers_everything_once_in_near_equal_parts() -> None:
    labels = np.repeat(np.arange(NUM_CLASSES), 101)  # 1,010 examples over 7 devices
    parts = partition_indices(labels, 7, "iid", seed=0)
    assert len(parts) == 7
    joined = assert_disjoint(parts, len(labels))
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # IidPartitioner alone cuts contiguous blocks; our seeded shuffle makes them mixed even on
    # class-sorted data.
    for p in parts:
        assert len(np.unique(labels[p])) == NUM_CLASSES
    assert skew(labels, parts) < 0.15


def test_iid_deterministic_by_seed() -> None:
    a = partition_indices(SORTED_LABELS, 5, "iid", seed=1)
    b = partition_indices(SORTED_LABELS, 5, PartitionSpec("iid"), seed=1)
    c = partition_indices(SORTED_LABELS, 5, "iid", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


# --------------------------------------------------------------------------------------------
# dirichlet


def test_dirichlet_deterministic_disjoint_and_skewed() -> None:
    labels = SORTED_LABELS
    a = partition_indices(labels, 10, "dirichlet:0.5", seed=0)
    b = partition_indices(labels, 10, "dirichlet:0.5", seed=0)
    c = partition_indices(labels, 10, "dirichlet:0.5", seed=1)
    assert len(a) == 10
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))

    joined = assert_disjoint(a, len(labels))
    # flwr-datasets' Dirichlet split hands out every example of every class.
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
    assert min(len(p) for p in a) >= dirichlet_min_partition_size(len(labels), 10)

    iid = partition_indices(labels, 10, "iid", seed=0)
    assert skew(labels, a) > 3 * skew(labels, iid)
    assert skew(labels, a) > 0.3


def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    labels = SORTED_LABELS
    near_iid = partition_indices(labels, 5, "dirichlet:1000", seed=0)
    skewed = partition_indices(labels, 5, "dirichlet:0.1", seed=0)
    assert skew(labels, near_iid) < 0.1 < skew(labels, skewed)


def test_dirichlet_impossible_constraints_raise_value_error() -> None:
    labels = np.arange(1000) % NUM_CLASSES
    with pytest.raises(ValueError, match=r"dirichlet:0\.01 across 100 devices.*larger ALPHA"):
        partition_indices(labels, 100, "dirichlet:0.01", seed=0)


def test_dirichlet_min_partition_size() -> None:
    assert dirichlet_min_partition_size(60000, 100) == 10
    assert dirichlet_min_partition_size(1000, 100) == 2
    assert dirichlet_min_partition_size(10, 10) == 1


# --------------------------------------------------------------------------------------------
# shards


def test_shards_two_labels_per_device_on_sorted_balanced_data() -> None:
    labels = SORTED_LABELS
    parts = partition_indices(labels, 10, "shards:2", seed=0)
    assert_disjoint(parts, len(labels))
    # 20 shards of 1000 // 20 = 50; class sizes (100) are multiples of 50, so each shard is
    # one class and each device sees at most 2 labels.
    assert [len(p) for p in parts] == [100] * 10
    for p in parts:
        assert len(np.unique(labels[p])) <= 2
    assert partition_indices(labels, 10, "shards:2", seed=0)[3].tolist() == parts[3].tolist()


def test_shards_on_uneven_data_drop_remainder_and_may_straddle_classes() -> None:
    # Classes of 97..106 examples: shards (size 1,015 // 21 = 48) cross class boundaries, so a
    # device with K shards can see up to 2K labels, and the 1,015 - 21 * 48 = 7 leftovers are
    # given to nobody.
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), np.arange(97, 107)))
    n = len(labels)
    parts = partition_indices(labels, 7, "shards:3", seed=0)
    joined = assert_disjoint(parts, n)
    shard_size = n // (7 * 3)
    assert [len(p) for p in parts] == [3 * shard_size] * 7
    assert len(joined) == n - (n - 7 * 3 * shard_size)
    for p in parts:
        assert len(np.unique(labels[p])) <= 2 * 3
