"""The device protocol: generated stubs are fresh, and updates survive the wire exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedcoreml.ios_bridge.channel import MAX_MESSAGE_BYTES
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
from fedcoreml.ios_bridge.tensor_codec import (
    UPDATE_REFUSALS,
    MalformedUpdateError,
    UpdateHeader,
    decode_update,
    encode_update,
)
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.ios_bridge.wire.generate import PROTO_ROOT, stale_files

HEADER = UpdateHeader("session", "task-1", 120, 0.25, 0.9, 3.5)


def test_checked_in_stubs_match_the_proto():
    assert stale_files() == [], "run: python -m fedcoreml.ios_bridge.wire.generate"


def test_a_changed_proto_makes_the_stubs_stale(tmp_path):
    root = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, root)
    proto = root / "fedcoreml" / "v1" / "device.proto"
    proto.write_text(
        proto.read_text().replace("bool accepted = 1;", "bool accepted = 1; int32 x = 9;")
    )
    assert "device_pb2.py" in stale_files(root)


def test_round_trip_is_exact_and_every_message_fits(default_spec):
    rng = np.random.default_rng(0)
    params = [(n, rng.standard_normal(v.shape).astype(np.float32)) for n, v in
              get_parameters(default_spec)]  # fmt: skip
    messages = list(encode_update(HEADER, params, chunk_bytes=256 * 1024))
    assert all(m.ByteSize() < MAX_MESSAGE_BYTES for m in messages)
    assert sum(m.HasField("tensor") for m in messages) > len(params)  # hidden1 was split
    wire = [device_pb2.UpdateChunk.FromString(m.SerializeToString()) for m in messages]
    header, received = decode_update(wire, parameter_infos(default_spec))
    assert (header.task_id, header.num_examples) == ("task-1", 120)
    for (name, sent), (name_back, got) in zip(params, received, strict=True):
        assert name == name_back and got.dtype == np.float32
        np.testing.assert_array_equal(sent, got)


def _messages(spec, mutate=None):
    params = get_parameters(spec)
    messages = list(encode_update(HEADER, params, chunk_bytes=1024 * 1024))
    if mutate is not None:
        changed = mutate(messages)
        messages = messages if changed is None else changed
    return messages


def _tensor(messages, name):
    return next(m for m in messages if m.HasField("tensor") and m.tensor.name == name)


def _set_nan(messages):
    data = bytearray(_tensor(messages, "conv1.bias").tensor.data)
    data[0:4] = np.array([np.nan], "<f4").tobytes()
    _tensor(messages, "conv1.bias").tensor.data = bytes(data)


def _swap_hidden1_slices(messages):
    slices = [i for i, m in enumerate(messages) if m.tensor.name == "hidden1.weights"]
    messages[slices[0]], messages[slices[1]] = messages[slices[1]], messages[slices[0]]


def _interleave_hidden1(messages):
    """hidden1.bias sent between the first and second slices of hidden1.weights."""
    slices = [i for i, m in enumerate(messages) if m.tensor.name == "hidden1.weights"]
    bias = messages.pop(next(i for i, m in enumerate(messages) if m.tensor.name == "hidden1.bias"))
    messages.insert(slices[1], bias)


def _shift_second_slice(messages):
    slices = [i for i, m in enumerate(messages) if m.tensor.name == "hidden1.weights"]
    messages[slices[1]].tensor.offset += 2


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (lambda m: m[1:], "no_header", "the first message must be the update header"),
        (lambda m: [*m, m[0]], "second_header", "message 11: a second header"),
        (lambda m: [*m, device_pb2.UpdateChunk()], "empty_message",
         "message 11: empty (neither header nor tensor)"),
        (lambda m: m[:-1], "missing_tensors", "missing tensor(s): hidden2.bias"),
        (lambda m: [*m, m[-1]], "tensor_sent_twice", "tensor 'hidden2.bias' sent twice"),
        (lambda m: [*m, m[1]], "tensor_sent_twice", "tensor 'conv1.weights' sent twice"),
        (_interleave_hidden1, "tensors_interleaved",
         "tensor 'hidden1.weights' interleaved with 'hidden1.bias': send all slices of one "
         "tensor before the next"),
        (lambda m: _tensor(m, "conv2.bias").tensor.__setattr__("name", "conv3.bias"),
         "unknown_tensor", "unknown tensor 'conv3.bias'"),
        (lambda m: _tensor(m, "conv1.weights").tensor.shape.__setitem__(slice(None), [32, 9]),
         "wrong_shape", "tensor 'conv1.weights': expected shape [32, 1, 3, 3], got [32, 9]"),
        (lambda m: _tensor(m, "hidden2.bias").tensor.__setattr__("data", b"\0" * 36),
         "tensor_too_short",
         "tensor 'hidden2.bias': 36 bytes for shape [10], which needs 40 bytes"),
        (lambda m: _tensor(m, "conv1.bias").tensor.__setattr__("data", b""),
         "tensor_too_short", "tensor 'conv1.bias': 0 bytes for shape [32], which needs 128 bytes"),
        (lambda m: _tensor(m, "hidden2.bias").tensor.__setattr__("data", b"\0" * 44),
         "tensor_too_long",
         "tensor 'hidden2.bias': 44 bytes for shape [10], which holds 40 bytes"),
        (lambda m: _tensor(m, "hidden2.bias").tensor.__setattr__("data", b"\0" * 38),
         "misaligned_slice", "tensor 'hidden2.bias': a slice of 38 bytes at byte 0; slices must "
         "start on a 4-byte boundary and hold whole float32 values"),
        (_shift_second_slice, "misaligned_slice", "a slice of 1048576 bytes at byte 1048578"),
        (_set_nan, "non_finite_values", "tensor 'conv1.bias': 1 non-finite value(s) (NaN or Inf)"),
        (_swap_hidden1_slices, "slice_out_of_order", "slice at byte 1048576, expected byte 0"),
        (lambda m: m[0].header.__setattr__("num_tensors", 7), "tensor_count_mismatch",
         "the header announces 7 tensors but 8 arrived"),
        (lambda m: [], "empty_update", "empty update: no header and no tensors"),
    ],
)  # fmt: skip
def test_malformed_updates_are_refused_precisely(default_spec, mutate, key, message):
    with pytest.raises(MalformedUpdateError) as err:
        decode_update(_messages(default_spec, mutate), parameter_infos(default_spec))
    assert message in str(err.value)
    assert err.value.key == key and key in UPDATE_REFUSALS


def test_client_strings_in_update_refusals_are_bounded(default_spec):
    """A 10,000-character tensor name (or shape) comes back cut, on one line, its size noted."""
    long_name = "x\n" * 5_000

    def rename(messages):
        _tensor(messages, "conv2.bias").tensor.name = long_name

    with pytest.raises(MalformedUpdateError) as err:
        decode_update(_messages(default_spec, rename), parameter_infos(default_spec))
    text = str(err.value)
    assert "(10,000 chars)" in text and "\n" not in text and len(text) < 600
    assert text.startswith("unknown tensor 'x\\nx\\n")

    def reshape(messages):
        _tensor(messages, "conv2.bias").tensor.shape[:] = [1] * 100_000

    with pytest.raises(MalformedUpdateError) as err:
        decode_update(_messages(default_spec, reshape), parameter_infos(default_spec))
    assert "(100,000 dimensions)" in str(err.value) and len(str(err.value)) < 200
