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
from fedcoreml.ios_bridge.echo import shown
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.parameters import ParameterInfo
from fedcoreml.ios_bridge.wire import device_pb2

#: Every way an update stream can be malformed: a stable key and the one wording of its message
#: (``str.format`` fields; a client's string is shown bounded, see :mod:`~.echo`). The gateway
#: refuses each with ``INVALID_ARGUMENT`` and lists them in its refusal table.
UPDATE_REFUSALS: dict[str, str] = {
    "empty_update": "empty update: no header and no tensors",
    "no_header": "the first message must be the update header",
    "second_header": "message {index}: a second header; send exactly one, first",
    "empty_message": "message {index}: empty (neither header nor tensor)",
    "unknown_tensor": "unknown tensor {name}; the model's updatable parameters are {names}",
    "wrong_shape": "tensor {name}: expected shape {expected}, got {got}",
    "misaligned_slice": (
        "tensor {name}: a slice of {length} bytes at byte {offset}; slices must start on a "
        "4-byte boundary and hold whole float32 values"
    ),
    "tensor_sent_twice": "tensor {name} sent twice",
    "tensors_interleaved": (
        "tensor {name} interleaved with {current}: send all slices of one tensor before the next"
    ),
    "slice_out_of_order": (
        "tensor {name}: slice at byte {offset}, expected byte {expected} (slices must come in "
        "order, without gaps or overlaps)"
    ),
    "tensor_too_long": (
        "tensor {name}: {size} bytes for shape {shape}, which holds {needed} bytes of float32"
    ),
    "tensor_too_short": (
        "tensor {name}: {size} bytes for shape {shape}, which needs {needed} bytes of float32"
    ),
    "non_finite_values": "tensor {name}: {count} non-finite value(s) (NaN or Inf)",
    "missing_tensors": "missing tensor(s): {names}",
    "tensor_count_mismatch": "the header announces {announced} tensors but {arrived} arrived",
}

_SHOWN_DIMS = 8  # dimensions of a client's shape shown in a message


class MalformedUpdateError(FedCoreMLError):
    """An update stream that does not match the model: the message says what and where.

    ``key`` names the entry of :data:`UPDATE_REFUSALS` it was raised from.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _malformed(key: str, **fields: object) -> MalformedUpdateError:
    return MalformedUpdateError(UPDATE_REFUSALS[key].format(**fields), key)


def _dims(shape: Iterable[int]) -> str:
    """A shape as a list, bounded: a client may send a million dimensions."""
    dims = list(shape)
    if len(dims) <= _SHOWN_DIMS:
        return str(dims)
    head = ", ".join(str(d) for d in dims[:_SHOWN_DIMS])
    return f"[{head}, …] ({len(dims):,} dimensions)"


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


def first_header(
    chunks: Iterable[device_pb2.UpdateChunk],
) -> tuple[device_pb2.UpdateChunk, Iterator[device_pb2.UpdateChunk]]:
    """The stream's first message, which must be a header, and the rest of the stream.

    Lets a server check who is sending (the header's session and task) before it reads, and
    buffers, any tensor.
    """
    messages = iter(chunks)
    first = next(messages, None)
    if first is None:
        raise _malformed("empty_update")
    if first.WhichOneof("part") != "header":
        raise _malformed("no_header")
    return first, messages


def decode_update(
    chunks: Iterable[device_pb2.UpdateChunk], infos: list[ParameterInfo]
) -> tuple[UpdateHeader, list[tuple[str, np.ndarray]]]:
    """Reassemble and check an update stream against the model's parameters (``infos``).

    Raises MalformedUpdateError (one of :data:`UPDATE_REFUSALS`) for a missing or repeated
    header, an unknown, repeated, missing or misshapen tensor, a slice off a 4-byte boundary or
    out of order, interleaved tensors, a byte length that does not match the shape, a tensor
    count that disagrees with the header, or non-finite values.
    """
    header_msg, messages = first_header(chunks)
    expected = {info.name: info for info in infos}
    buffers: dict[str, bytearray] = {}  # tensors begun, in arrival order
    current: str | None = None
    for index, chunk in enumerate(messages, start=1):
        part = chunk.WhichOneof("part")
        if part == "header":
            raise _malformed("second_header", index=index)
        if part != "tensor":
            raise _malformed("empty_message", index=index)
        _add_slice(chunk.tensor, expected, buffers, current)
        current = chunk.tensor.name
    for name, buffer in buffers.items():
        needed = 4 * expected[name].size
        if len(buffer) < needed:
            raise _malformed(
                "tensor_too_short", name=shown(name), size=len(buffer),
                shape=list(expected[name].shape), needed=needed,
            )  # fmt: skip
    missing = [name for name in expected if name not in buffers]
    if missing:
        raise _malformed("missing_tensors", names=", ".join(missing))
    if header_msg.header.num_tensors != len(buffers):
        raise _malformed(
            "tensor_count_mismatch", announced=header_msg.header.num_tensors, arrived=len(buffers)
        )
    parameters = []
    for info in infos:
        value = np.frombuffer(buffers[info.name], dtype="<f4").reshape(info.shape)
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise _malformed("non_finite_values", name=shown(info.name), count=bad)
        parameters.append((info.name, value))
    h = header_msg.header
    header = UpdateHeader(
        session_id=h.session_id,
        task_id=h.task_id,
        num_examples=int(h.num_examples),
        loss=float(h.loss),
        accuracy=float(h.accuracy),
        train_seconds=float(h.train_seconds),
    )
    return header, parameters


def _add_slice(
    t: device_pb2.TensorChunk,
    expected: dict[str, ParameterInfo],
    buffers: dict[str, bytearray],
    current: str | None,
) -> None:
    """Check one tensor slice against the model and what came before; append its bytes."""
    info = expected.get(t.name)
    name = shown(t.name)
    if info is None:
        raise _malformed("unknown_tensor", name=name, names=", ".join(expected))
    if tuple(t.shape) != info.shape:
        raise _malformed("wrong_shape", name=name, expected=list(info.shape), got=_dims(t.shape))
    if t.offset % 4 or len(t.data) % 4:
        raise _malformed("misaligned_slice", name=name, length=len(t.data), offset=t.offset)
    needed = 4 * info.size
    buffer = buffers.get(t.name)
    if buffer is not None and t.name != current:
        if len(buffer) == needed:
            raise _malformed("tensor_sent_twice", name=name)
        raise _malformed("tensors_interleaved", name=name, current=shown(current))
    if buffer is not None and buffer and t.offset == 0:
        raise _malformed("tensor_sent_twice", name=name)
    if buffer is None:
        buffer = buffers[t.name] = bytearray()
    if t.offset != len(buffer):
        raise _malformed("slice_out_of_order", name=name, offset=t.offset, expected=len(buffer))
    if len(buffer) + len(t.data) > needed:
        raise _malformed(
            "tensor_too_long", name=name, size=len(buffer) + len(t.data),
            shape=list(info.shape), needed=needed,
        )  # fmt: skip
    buffer.extend(t.data)
