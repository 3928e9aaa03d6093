"""Parameters on the wire: Core ML-layout float32 tensors as chunked ``UpdateChunk`` streams.

A device's update is one ``UpdateHeader`` followed by every updatable tensor, each as one or
more ``TensorChunk`` slices of its little-endian float32 bytes, so that no message exceeds the
4 MiB limit a phone's gRPC stack receives by default. ``decode_update`` is the strict inverse:
it accepts exactly the tensors a model expects and says precisely what is wrong otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fedcoreml.ios_bridge.channel import DEFAULT_CHUNK_BYTES
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.parameters import ParameterInfo, check_parameters
from fedcoreml.ios_bridge.wire import device_pb2


class MalformedUpdateError(FedCoreMLError):
    """An update stream that does not match the model: the message says what and where."""


@dataclass(frozen=True)
class UpdateHeader:
    session_id: str
    task_id: str
    num_examples: int
    loss: float
    accuracy: float
    train_seconds: float


def encode_update(
    header: UpdateHeader,
    parameters: list[tuple[str, np.ndarray]],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[device_pb2.UpdateChunk]:
    """The messages of one SubmitUpdate stream."""
    if chunk_bytes < 4 or chunk_bytes % 4:
        raise ValueError(f"chunk_bytes must be a positive multiple of 4, got {chunk_bytes}")
    yield device_pb2.UpdateChunk(
        header=device_pb2.UpdateHeader(
            session_id=header.session_id,
            task_id=header.task_id,
            num_examples=header.num_examples,
            loss=header.loss,
            accuracy=header.accuracy,
            train_seconds=header.train_seconds,
            num_tensors=len(parameters),
        )
    )
    for name, value in parameters:
        payload = np.ascontiguousarray(value, dtype="<f4").tobytes()
        shape = [int(d) for d in np.shape(value)]
        for offset in range(0, max(len(payload), 1), chunk_bytes):
            yield device_pb2.UpdateChunk(
                tensor=device_pb2.TensorChunk(
                    name=name,
                    shape=shape,
                    offset=offset,
                    data=payload[offset : offset + chunk_bytes],
                )
            )


def decode_update(
    chunks: Iterable[device_pb2.UpdateChunk], infos: list[ParameterInfo]
) -> tuple[UpdateHeader, list[tuple[str, np.ndarray]]]:
    """Reassemble and check an update stream against the model's parameters (``infos``).

    Raises MalformedUpdateError for a missing or repeated header, an unknown, repeated, missing or
    misshapen tensor, slices out of order or overlapping, a byte length that does not match the
    shape, a tensor count that disagrees with the header, or non-finite values.
    """
    expected = {info.name: info for info in infos}
    header_msg: device_pb2.UpdateHeader | None = None
    buffers: dict[str, bytearray] = {}
    done: set[str] = set()
    current: str | None = None
    for index, chunk in enumerate(chunks):
        part = chunk.WhichOneof("part")
        if part == "header":
            if header_msg is not None:
                raise MalformedUpdateError(
                    f"message {index}: a second header; send exactly one, first"
                )
            if index != 0:
                raise MalformedUpdateError(f"message {index}: the header must be the first message")
            header_msg = chunk.header
            continue
        if header_msg is None:
            raise MalformedUpdateError("the first message must be the update header")
        if part != "tensor":
            raise MalformedUpdateError(f"message {index}: empty (neither header nor tensor)")
        t = chunk.tensor
        info = expected.get(t.name)
        if info is None:
            raise MalformedUpdateError(
                f"unknown tensor '{t.name}'; the model's updatable parameters are "
                f"{', '.join(expected)}"
            )
        if tuple(t.shape) != info.shape:
            raise MalformedUpdateError(
                f"tensor '{t.name}': expected shape {list(info.shape)}, got {list(t.shape)}"
            )
        buffer = buffers.setdefault(t.name, bytearray())
        if t.name in done or (buffer and (t.name != current or t.offset == 0)):
            raise MalformedUpdateError(f"tensor '{t.name}' sent twice")
        if t.offset != len(buffer):
            raise MalformedUpdateError(
                f"tensor '{t.name}': slice at byte {t.offset}, expected byte {len(buffer)} "
                "(slices must come in order, without gaps or overlaps)"
            )
        size = 4 * info.size
        if len(buffer) + len(t.data) > size:
            raise MalformedUpdateError(
                f"tensor '{t.name}': {len(buffer) + len(t.data)} bytes for shape "
                f"{list(info.shape)}, which holds {size} bytes of float32"
            )
        if current is not None and current != t.name:
            _finish(current, buffers, expected, done)
        current = t.name
        buffer.extend(t.data)
    if header_msg is None:
        raise MalformedUpdateError("empty update: no header and no tensors")
    if current is not None:
        _finish(current, buffers, expected, done)
    missing = [name for name in expected if name not in done]
    if missing:
        raise MalformedUpdateError(f"missing tensor(s): {', '.join(missing)}")
    if header_msg.num_tensors != len(done):
        raise MalformedUpdateError(
            f"the header announces {header_msg.num_tensors} tensors but {len(done)} arrived"
        )
    parameters = [
        (info.name, np.frombuffer(buffers[info.name], dtype="<f4").reshape(info.shape))
        for info in infos
    ]
    try:
        check_parameters(infos, parameters)
    except FedCoreMLError as exc:
        raise MalformedUpdateError(str(exc)) from None
    header = UpdateHeader(
        session_id=header_msg.session_id,
        task_id=header_msg.task_id,
        num_examples=int(header_msg.num_examples),
        loss=float(header_msg.loss),
        accuracy=float(header_msg.accuracy),
        train_seconds=float(header_msg.train_seconds),
    )
    return header, parameters


def _finish(
    name: str, buffers: dict[str, bytearray], expected: dict[str, ParameterInfo], done: set[str]
) -> None:
    size = 4 * expected[name].size
    if len(buffers[name]) != size:
        raise MalformedUpdateError(
            f"tensor '{name}': {len(buffers[name])} bytes for shape "
            f"{list(expected[name].shape)}, which needs {size} bytes of float32"
        )
    done.add(name)
