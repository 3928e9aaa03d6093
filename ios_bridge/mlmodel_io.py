"""Read and write .mlmodel files and bytes as Core ML ``Model`` protobuf specs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from google.protobuf.message import DecodeError

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic
from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import ModelFormatError

Spec = Model_pb2.Model


def spec_from_bytes(data: bytes, source: str = "model bytes") -> Spec:
    """Parse serialized .mlmodel bytes; ``source`` names them in the error message."""
    if not data:
        raise ModelFormatError(f"{source}: empty, expected a serialized Core ML model (.mlmodel)")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except DecodeError as exc:
        raise ModelFormatError(
            f"{source}: not a Core ML .mlmodel (protobuf decode failed: {exc})"
        ) from exc
    if spec.specificationVersion <= 0 or spec.WhichOneof("Type") is None:
        raise ModelFormatError(
            f"{source}: not a Core ML .mlmodel (no specification version or model type)"
        )
    return spec


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read a .mlmodel file (an .mlpackage is an ML Program, outside fedcoreml's scope)."""
    file = Path(path)
    if file.is_dir():
        raise ModelFormatError(
            f"{file}: is a directory (an .mlpackage?); fedcoreml trains NeuralNetwork "
            ".mlmodel files"
        )
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: no such model file") from None
    return spec_from_bytes(data, source=str(file))


def spec_to_bytes(spec: Spec) -> bytes:
    """Serialize a spec; the same spec always gives the same bytes."""
    return spec.SerializeToString(deterministic=True)


def save_spec(spec: Spec, path: str | os.PathLike[str]) -> Path:
    """Write a spec to ``path`` atomically."""
    return write_bytes_atomic(path, spec_to_bytes(spec))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
