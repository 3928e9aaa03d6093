"""Tests for fedcoreml.ios_bridge.datasets: IDX / npz loaders, the download, the bundled sample."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedcoreml.ios_bridge import datasets as data
from fedcoreml.ios_bridge.datasets import DataError, Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------------------------
# helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (magic 0x0000 08 ndim, big-endian dims, data)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool | None = None) -> Path:
    raw = idx_bytes(array)
    if gz is None:
        gz = path.suffix == ".gz"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_arrays(n_train: int = 30, n_test: int = 20, size: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], gz: dict[str, bool]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        name = f"{stem}.gz" if gz[key] else stem
        write_idx(directory / name, arrays[key], gz=gz[key])
    return directory


ALL_GZ = dict.fromkeys(data.IDX_FILES, True)


def assert_coreml_layout(ds: Dataset, n_train: int, n_test: int, size: int = 28) -> None:
    assert ds.x_train.shape == (n_train, 1, size, size)
    assert ds.x_test.shape == (n_test, 1, size, size)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


# --------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_images_and_labels(tmp_path: Path, suffix: str) -> None:
    arrays = make_arrays()
    images = write_idx(tmp_path / f"images{suffix}", arrays["x_train"])
    labels = write_idx(tmp_path / f"labels{suffix}", arrays["y_train"])
    got_images = data.read_idx(images)
    got_labels = data.read_idx(str(labels))
    assert got_images.dtype == np.uint8 and got_images.shape == (30, 28, 28)
    np.testing.assert_array_equal(got_images, arrays["x_train"])
    np.testing.assert_array_equal(got_labels, arrays["y_train"])
    got_images[0, 0, 0] = 1  # returned arrays are writable copies


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    raw[2] = 0x0D  # float32 dtype code
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as info:
        data.read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "expected IDX magic 0x00000803 (uint8 images) or 0x00000801 (uint8 labels)" in message
    assert "got 0x00000D03" in message


def test_read_idx_not_idx_at_all(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(b"hello, world")
    with pytest.raises(DataError, match="expected IDX magic") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    raw = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(raw[:-100])
    with pytest.raises(DataError) as info:
        data.read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated: header says 5x28x28 = 3920 bytes" in message
    assert "file has 3820" in message


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:10])
    with pytest.raises(DataError, match="truncated") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_trailing_data(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\0\0")
    with pytest.raises(DataError, match="trailing data") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(500, np.uint8)))[:20])
    with pytest.raises(DataError, match="gzip") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(DataError, match="not found") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# load_idx_dir / load_npz


def test_load_idx_dir_gzipped(tmp_path: Path) -> None:
    arrays = make_arrays()
    ds = data.load_idx_dir(write_idx_dir(tmp_path / "mnist", arrays, ALL_GZ))
    assert_coreml_layout(ds, 30, 20)
    np.testing.assert_allclose(ds.x_train[:, 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.num_classes == 10
    assert ds.name == str(tmp_path / "mnist")


def test_load_idx_dir_mixed_raw_and_gz(tmp_path: Path) -> None:
    arrays = make_arrays()
    gz = {"x_train": False, "y_train": True, "x_test": True, "y_test": False}
    ds = data.load_idx_dir(write_idx_dir(tmp_path, arrays, gz))
    assert_coreml_layout(ds, 30, 20)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])


def test_load_idx_dir_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    write_idx_dir(tmp_path, arrays, ALL_GZ)
    with pytest.raises(DataError) as info:
        data.load_idx_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in message
    assert "30 images" in message and "29 labels" in message


def test_load_idx_dir_labels_where_images_expected(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays["x_test"] = arrays["y_test"]
    write_idx_dir(tmp_path, arrays, ALL_GZ)
    with pytest.raises(DataError, match="expected images") as info:
        data.load_idx_dir(tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_load_idx_dir_missing_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, make_arrays(), ALL_GZ)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\]") as info:
        data.load_idx_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_idx_dir_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        data.load_idx_dir(tmp_path / "missing")


def test_load_npz_and_directory_with_mnist_npz(tmp_path: Path) -> None:
    arrays = make_arrays()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    ds = data.load_npz(tmp_path / "mnist.npz")
    assert_coreml_layout(ds, 30, 20)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    from_dir = data.load_idx_dir(tmp_path)
    np.testing.assert_array_equal(from_dir.x_test, ds.x_test)


def test_load_npz_missing_keys(tmp_path: Path) -> None:
    arrays = make_arrays()
    del arrays["y_test"], arrays["x_test"]
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        data.load_npz(path)
    message = str(info.value)
    assert str(path) in message and "x_test" in message and "y_test" in message


def test_load_npz_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz") as info:
        data.load_npz(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# download


def test_download_mnist_verifies_and_caches(tmp_path: Path) -> None:
    source = tmp_path / "src" / "mnist.npz"
    source.parent.mkdir()
    np.savez_compressed(source, **make_arrays())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"

    got = data.download_mnist(cache, url=source.as_uri(), sha256=digest)
    assert got == cache / "mnist.npz"
    assert got.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.npz"]  # no temp files left

    # A cached copy that verifies is returned without downloading: the URL no longer exists.
    source.unlink()
    assert data.download_mnist(cache, url=source.as_uri(), sha256=digest) == got
    assert_coreml_layout(data.load_npz(got), 30, 20)


def test_download_mnist_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "mnist.npz"
    np.savez_compressed(source, **make_arrays())
    actual = hashlib.sha256(source.read_bytes()).hexdigest()
    wrong = "0" * 64
    cache = tmp_path / "cache"
    url = source.as_uri()
    with pytest.raises(DataError) as info:
        data.download_mnist(cache, url=url, sha256=wrong)
    message = str(info.value)
    assert url in message and wrong in message and actual in message
    assert list(cache.iterdir()) == []


def test_download_mnist_replaces_bad_cached_copy(tmp_path: Path) -> None:
    source = tmp_path / "mnist.npz"
    np.savez_compressed(source, **make_arrays())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mnist.npz").write_bytes(b"stale")
    got = data.download_mnist(cache, url=source.as_uri(), sha256=digest)
    assert got.read_bytes() == source.read_bytes()


def test_download_mnist_unreachable(tmp_path: Path) -> None:
    url = (tmp_path / "absent.npz").as_uri()
    with pytest.raises(DataError, match="could not download") as info:
        data.download_mnist(tmp_path / "cache", url=url)
    assert url in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------------------------
# load_dataset, limit


def test_load_dataset_sources(tmp_path: Path) -> None:
    arrays = make_arrays()
    write_idx_dir(tmp_path / "idx", arrays, ALL_GZ)
    np.savez(tmp_path / "some.npz", **arrays)
    assert data.load_dataset(tmp_path / "idx").num_train == 30
    assert data.load_dataset(str(tmp_path / "some.npz")).num_test == 20
    assert data.load_dataset(None).name == "sample"
    assert data.load_dataset("sample").num_train == 2000


def test_load_dataset_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="no such file or directory") as info:
        data.load_dataset(missing)
    assert str(missing) in str(info.value)
    other = tmp_path / "file.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=r"expected a \.npz file"):
        data.load_dataset(other)


def test_load_dataset_mnist_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npz = tmp_path / "mnist.npz"
    np.savez(npz, **make_arrays())
    calls: list[Path] = []

    def fake_download(cache_dir: Path) -> Path:
        calls.append(Path(cache_dir))
        return npz

    monkeypatch.setattr(data, "download_mnist", fake_download)
    ds = data.load_dataset("mnist-download", cache_dir=tmp_path / "cache")
    assert calls == [tmp_path / "cache"]
    assert ds.num_train == 30 and ds.name == data.MNIST_NPZ_URL
    data.load_dataset("mnist-download")
    assert calls[-1] == data.DEFAULT_CACHE_DIR == Path.home() / ".cache" / "fedcoreml"


def test_limit(tmp_path: Path) -> None:
    ds = data.load_npz(_saved_npz(tmp_path, make_arrays(n_train=50)))
    small = data.limit(ds, 10, seed=3)
    assert small.num_train == 10
    assert small.x_test is ds.x_test and small.y_test is ds.y_test
    again = data.limit(ds, 10, seed=3)
    np.testing.assert_array_equal(small.x_train, again.x_train)
    other = data.limit(ds, 10, seed=4)
    assert not np.array_equal(small.x_train, other.x_train)
    # every chosen row is a distinct row of the original
    flat = ds.x_train.reshape(50, -1)
    rows = [int(np.flatnonzero((flat == r).all(axis=1))[0]) for r in small.x_train.reshape(10, -1)]
    assert len(set(rows)) == 10
    np.testing.assert_array_equal(ds.y_train[rows], small.y_train)
    assert data.limit(ds, None, seed=0) is ds
    assert data.limit(ds, 500, seed=0) is ds
    with pytest.raises(ValueError):
        data.limit(ds, 0, seed=0)


def _saved_npz(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------
# bundled sample


def test_bundled_sample() -> None:
    ds = data.load_bundled_sample()
    assert_coreml_layout(ds, 2000, 1000)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [200] * 10)
    assert set(np.unique(ds.y_test).tolist()) == set(range(10))
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    # shuffled, not class-sorted
    assert len(np.unique(ds.y_train[:50])) > 5


def test_make_bundled_sample_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        "y_train": np.repeat(np.arange(10), 30).astype(np.uint8),  # class-sorted
        "x_test": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(100) % 10).astype(np.uint8),
    }
    source = write_idx_dir(tmp_path / "idx", arrays, ALL_GZ)
    out = tmp_path / "out" / "sample.npz"
    argv = ["make-sample", "--from", str(source), "--out", str(out)]
    assert data.main([*argv, "--n-train", "100", "--n-test", "40", "--seed", "5"]) == 0
    with np.load(out) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert npz["x_train"].shape == (100, 28, 28) and npz["x_train"].dtype == np.uint8
        assert npz["y_train"].dtype == np.uint8 and npz["x_test"].shape == (40, 28, 28)
        np.testing.assert_array_equal(np.bincount(npz["y_train"]), [10] * 10)
        # each sampled image is the original image of its label
        for image, label in zip(npz["x_train"][:20], npz["y_train"][:20], strict=True):
            matches = np.flatnonzero((arrays["x_train"] == image).all(axis=(1, 2)))
            assert arrays["y_train"][matches[0]] == label
    first = out.read_bytes()
    out2 = data.make_bundled_sample(source, tmp_path / "again.npz", 100, 40, seed=5)
    assert out2.read_bytes() == first  # byte-for-byte reproducible
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        data.make_bundled_sample(source, tmp_path / "bad.npz", n_train=105)
    with pytest.raises(ValueError, match="fewer than"):
        data.make_bundled_sample(source, tmp_path / "bad.npz", n_train=400)


@pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason=f"shared MNIST data not present at {SHARED_MNIST}"
)
def test_shared_mnist_dir() -> None:
    ds = data.load_dataset(SHARED_MNIST)
    assert_coreml_layout(ds, 5000, 10000)
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [500] * 10)
    assert ds.num_classes == 10
