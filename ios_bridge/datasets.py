"""MNIST-style data for the simulated devices: IDX and Keras ``.npz`` loaders, a download, a sample.

Everything comes back as a :class:`Dataset` whose images are already in the layout the Core ML
model takes: float32 ``[N, 1, H, W]`` (channels first, MNIST is ``H = W = 28``) scaled to 0..1,
with int64 labels ``[N]``.

Sources :func:`load_dataset` understands:

* ``None`` or ``"sample"``: the bundled sample, ``ios_bridge/data/mnist_sample.npz`` (2,000
  class-balanced training and 1,000 test images of real MNIST; see ``data/README.md``);
* a directory holding the four standard IDX files, gzipped or not
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), or a Keras ``mnist.npz``;
* a ``.npz`` file in the Keras format (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``);
* ``"mnist-download"``: Keras' ``mnist.npz``, downloaded once into ``~/.cache/fedcoreml`` and
  checked against its sha256.

Anything missing or malformed raises :class:`DataError` naming the file and what was expected.

The bundled sample is rebuilt with::

    python -m fedcoreml.ios_bridge.datasets make-sample --from DIR --out PATH
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from fedcoreml.ios_bridge.errors import FedCoreMLError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "IDX_FILES",
    "MNIST_NPZ_SHA256",
    "MNIST_NPZ_URL",
    "DataError",
    "Dataset",
    "download_mnist",
    "limit",
    "load_bundled_sample",
    "load_dataset",
    "load_idx_dir",
    "load_npz",
    "main",
    "make_bundled_sample",
    "read_idx",
]

MNIST_NPZ_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "fedcoreml"

#: Standard IDX file names (without ``.gz``), keyed by the Keras array they become.
IDX_FILES: dict[str, str] = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
_IDX_EXPECTED = (
    f"expected IDX magic 0x{_IDX_IMAGES_MAGIC:08X} (uint8 images) "
    f"or 0x{_IDX_LABELS_MAGIC:08X} (uint8 labels)"
)
_GZIP_MAGIC = b"\x1f\x8b"
_SAMPLE_PACKAGE = "fedcoreml.ios_bridge"
_SAMPLE_RESOURCE = "data/mnist_sample.npz"
_DOWNLOAD_CHUNK = 1 << 20


class DataError(FedCoreMLError):
    """A data file or directory is missing or not in the expected format."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits in Core ML layout.

    ``x_*`` are float32 ``[N, 1, H, W]`` in 0..1, ``y_*`` int64 ``[N]``; ``name`` says where the
    data came from.
    """

    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    name: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes: the largest label in either split, plus one."""
        top = max(
            int(self.y_train.max(initial=-1)),
            int(self.y_test.max(initial=-1)),
        )
        return top + 1

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(1, H, W)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# IDX


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it when its content is gzip."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data: {exc}") from exc
    if path.suffix == ".gz":
        raise DataError(f"{path}: expected gzip data (the name ends in .gz), got raw bytes")
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped or raw): uint8 images ``[N, rows, cols]`` or labels ``[N]``.

    Only the two MNIST kinds are accepted: magic ``0x00000803`` (unsigned bytes, 3 dims) and
    ``0x00000801`` (unsigned bytes, 1 dim). The data length must match the header exactly.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, too short for an IDX header; {_IDX_EXPECTED}"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
        detail = ""
        if zero == 0:
            detail = f" (dtype code 0x{dtype_code:02X}, {ndim} dims)"
        raise DataError(f"{path}: {_IDX_EXPECTED}, got 0x{magic:08X}{detail}")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated: IDX header with {ndim} dims needs {header_len} bytes, "
            f"file has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(data) - header_len
    shape_text = "x".join(str(d) for d in dims)
    if body < expected:
        raise DataError(
            f"{path}: truncated: header says {shape_text} = {expected} bytes of data, "
            f"file has {body}"
        )
    if body > expected:
        raise DataError(
            f"{path}: {body - expected} bytes of trailing data: header says {shape_text} = "
            f"{expected} bytes of data, file has {body}"
        )
    array = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header_len)
    return array.reshape(dims).copy()


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_dir_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The four IDX files of ``directory`` as raw uint8 arrays, keyed like Keras' npz."""
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in IDX_FILES.items():
        found = _find_idx_file(directory, stem)
        if found is None:
            missing.append(f"{stem}[.gz]")
        else:
            paths[key] = found
    if missing:
        raise DataError(f"{directory}: missing IDX file(s): {', '.join(missing)}")

    arrays = {key: read_idx(path) for key, path in paths.items()}
    for key, array in arrays.items():
        want_images = key.startswith("x_")
        if want_images and array.ndim != 3:
            raise DataError(
                f"{paths[key]}: expected images (IDX magic 0x{_IDX_IMAGES_MAGIC:08X}, "
                f"[N, rows, cols]), got an array of shape {array.shape}"
            )
        if not want_images and array.ndim != 1:
            raise DataError(
                f"{paths[key]}: expected labels (IDX magic 0x{_IDX_LABELS_MAGIC:08X}, [N]), "
                f"got an array of shape {array.shape}"
            )
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        n_images, n_labels = len(arrays[x_key]), len(arrays[y_key])
        if n_images != n_labels:
            raise DataError(
                f"{paths[x_key]} has {n_images} images but {paths[y_key]} has "
                f"{n_labels} labels; the counts must agree"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{paths['x_train']} has images of {arrays['x_train'].shape[1:]} but "
            f"{paths['x_test']} has images of {arrays['x_test'].shape[1:]}; they must agree"
        )
    return arrays


# --------------------------------------------------------------------------------------------
# Conversion to Core ML layout


def _images_to_coreml(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 ``[N, H, W]`` (or float in 0..1) to float32 ``[N, 1, H, W]`` in 0..1."""
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise DataError(f"{where}: expected images of shape [N, H, W], got {images.shape}")
    if images.dtype == np.uint8:
        scaled = images.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(images.dtype, np.floating):
        if images.size and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise DataError(f"{where}: float images must lie in 0..1")
        scaled = images.astype(np.float32)
    else:
        raise DataError(f"{where}: expected uint8 images (0..255), got dtype {images.dtype}")
    return np.ascontiguousarray(scaled[:, np.newaxis, :, :])


def _labels_to_int64(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{where}: expected labels of shape [N], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels, got dtype {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"{where}: labels must be non-negative")
    return labels.astype(np.int64)


def _to_dataset(arrays: dict[str, np.ndarray], name: str, where: str) -> Dataset:
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise DataError(
                f"{where}: x_{split} has {n_x} images but y_{split} has {n_y} labels; "
                "the counts must agree"
            )
    return Dataset(
        x_train=_images_to_coreml(arrays["x_train"], f"{where} x_train"),
        y_train=_labels_to_int64(arrays["y_train"], f"{where} y_train"),
        x_test=_images_to_coreml(arrays["x_test"], f"{where} x_test"),
        y_test=_labels_to_int64(arrays["y_test"], f"{where} y_test"),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Loaders


def _read_npz_arrays(source: str | os.PathLike[str] | io.BufferedIOBase, where: str) -> dict:
    try:
        with np.load(source, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"{where}: missing key(s) {', '.join(missing)}; expected a Keras-style "
                    f"npz with keys {', '.join(NPZ_KEYS)} (found: {', '.join(npz.files) or '-'})"
                )
            return {key: npz[key] for key in NPZ_KEYS}
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where}: not a readable .npz file: {exc}") from exc


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load a Keras-style ``mnist.npz`` (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    path = Path(path)
    return _to_dataset(_read_npz_arrays(path, str(path)), name=str(path), where=str(path))


def load_idx_dir(directory: str | os.PathLike[str]) -> Dataset:
    """Load the four standard IDX files (gzipped or not) from ``directory``.

    A directory without IDX files but with a Keras ``mnist.npz`` is loaded from that instead.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    has_idx = any(_find_idx_file(directory, stem) is not None for stem in IDX_FILES.values())
    if not has_idx and (directory / "mnist.npz").is_file():
        return load_npz(directory / "mnist.npz")
    arrays = _read_idx_dir_arrays(directory)
    return _to_dataset(arrays, name=str(directory), where=str(directory))


def load_bundled_sample() -> Dataset:
    """The bundled 2,000 + 1,000 image MNIST sample (``ios_bridge/data/mnist_sample.npz``)."""
    resource = resources.files(_SAMPLE_PACKAGE).joinpath(_SAMPLE_RESOURCE)
    where = f"{_SAMPLE_PACKAGE}/{_SAMPLE_RESOURCE}"
    try:
        with resource.open("rb") as handle:
            arrays = _read_npz_arrays(handle, where)
    except FileNotFoundError:
        raise DataError(
            f"{where}: bundled sample not found; rebuild it with "
            "`python -m fedcoreml.ios_bridge.datasets make-sample --from DIR --out PATH`"
        ) from None
    return _to_dataset(arrays, name="sample", where=where)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_DOWNLOAD_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_mnist(
    cache_dir: str | os.PathLike[str],
    url: str = MNIST_NPZ_URL,
    sha256: str = MNIST_NPZ_SHA256,
) -> Path:
    """Download ``url`` (Keras' ``mnist.npz``) into ``cache_dir`` and return its path.

    A cached copy whose sha256 matches is returned without touching the network. The download
    goes to a temporary file in ``cache_dir``, is checked against ``sha256`` and only then renamed
    into place, so a failed or corrupted download never leaves a file behind.
    """
    cache_dir = Path(cache_dir).expanduser()
    filename = Path(urllib.parse.urlparse(url).path).name or "mnist.npz"
    target = cache_dir / filename
    expected = sha256.lower()
    if target.is_file() and _sha256_file(target) == expected:
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=cache_dir)
    tmp_path = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as exc:
                raise DataError(f"could not download {url}: {exc}") from exc
        got = digest.hexdigest()
        if got != expected:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {expected}, got {got}; "
                "the download was discarded"
            )
        tmp_path.chmod(0o644)  # mkstemp makes it 0600
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
    return target


def load_dataset(
    source: str | os.PathLike[str] | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load a dataset from ``source`` (see the module docstring for the accepted forms).

    ``cache_dir`` is where ``"mnist-download"`` keeps its file (default ``~/.cache/fedcoreml``).
    """
    if source is None or (isinstance(source, str) and source == "sample"):
        return load_bundled_sample()
    if isinstance(source, str) and source == "mnist-download":
        path = download_mnist(DEFAULT_CACHE_DIR if cache_dir is None else cache_dir)
        dataset = load_npz(path)
        return Dataset(
            dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test, name=MNIST_NPZ_URL
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return load_idx_dir(path)
    if path.is_file():
        if path.suffix == ".npz":
            return load_npz(path)
        raise DataError(
            f"{path}: expected a .npz file or a directory of IDX files, got another file"
        )
    raise DataError(
        f"{path}: no such file or directory; expected 'sample', 'mnist-download', "
        "a directory of IDX files or a .npz file"
    )


def limit(dataset: Dataset, n_train: int | None, seed: int = 0) -> Dataset:
    """A random subset of ``n_train`` training examples (seeded); the test set is kept whole.

    ``None`` or a number at least the training set's size returns ``dataset`` unchanged. The
    subset comes in random order.
    """
    if n_train is None or n_train >= dataset.num_train:
        return dataset
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    chosen = np.random.default_rng(seed).permutation(dataset.num_train)[:n_train]
    return Dataset(
        x_train=dataset.x_train[chosen],
        y_train=dataset.y_train[chosen],
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        name=f"{dataset.name} (train limited to {n_train}, seed {seed})",
    )


# --------------------------------------------------------------------------------------------
# The bundled sample


def _write_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed timestamps, so equal data gives equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp_path = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as handle,
            zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        ):
            for key, array in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                archive.writestr(info, buffer.getvalue(), compresslevel=9)
        tmp_path.chmod(0o644)  # mkstemp makes it 0600
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def make_bundled_sample(
    source_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    n_train: int = 2000,
    n_test: int = 1000,
    seed: int = 0,
) -> Path:
    """Build the bundled sample from an IDX directory and write it as a Keras-style npz.

    Training: ``n_train / num_classes`` random images of each class (class-balanced), in random
    order. Test: ``n_test`` random test images. Stored as uint8 images ``[N, H, W]`` and uint8
    labels ``[N]`` in a compressed npz with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``.
    """
    source_dir = Path(source_dir)
    out_path = Path(out_path)
    if not source_dir.is_dir():
        raise DataError(f"{source_dir}: not a directory")
    arrays = _read_idx_dir_arrays(source_dir)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    x_test, y_test = arrays["x_test"], arrays["y_test"]

    classes = np.unique(y_train)
    if n_train % len(classes):
        raise ValueError(
            f"n_train ({n_train}) must be a multiple of the number of classes ({len(classes)})"
        )
    per_class = n_train // len(classes)
    rng = np.random.default_rng(seed)
    picked: list[np.ndarray] = []
    for label in classes:
        members = np.flatnonzero(y_train == label)
        if len(members) < per_class:
            raise ValueError(
                f"class {label} has {len(members)} training images, fewer than the "
                f"{per_class} per class needed for n_train={n_train}"
            )
        picked.append(rng.choice(members, size=per_class, replace=False))
    train_idx = rng.permutation(np.concatenate(picked))
    if n_test > len(y_test):
        raise ValueError(f"n_test ({n_test}) exceeds the {len(y_test)} test images available")
    test_idx = rng.choice(len(y_test), size=n_test, replace=False)

    _write_npz_reproducibly(
        out_path,
        {
            "x_train": x_train[train_idx].astype(np.uint8),
            "y_train": y_train[train_idx].astype(np.uint8),
            "x_test": x_test[test_idx].astype(np.uint8),
            "y_test": y_test[test_idx].astype(np.uint8),
        },
    )
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m fedcoreml.ios_bridge.datasets make-sample --from DIR ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedcoreml.ios_bridge.datasets", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-sample", help="build the bundled MNIST sample")
    make.add_argument("--from", dest="source", required=True, help="directory of IDX files")
    make.add_argument("--out", required=True, help="output .npz path")
    make.add_argument("--n-train", type=int, default=2000, help="training images (default 2000)")
    make.add_argument("--n-test", type=int, default=1000, help="test images (default 1000)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    try:
        out = make_bundled_sample(
            args.source, args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed
        )
    except ValueError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
