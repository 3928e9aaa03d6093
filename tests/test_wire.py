"""The device protocol: generated stubs are fresh, and updates survive the wire exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedcoreml.ios_bridge.channel import MAX_MESSAGE_BYTES
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos
from fedcoreml.ios_bridge.tensor_codec import (
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


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m[1:], "the first message must be the update header"),
        (lambda m: [*m, m[0]], "a second header"),
        (lambda m: m[:-1], "missing tensor(s): hidden2.bias"),
        (lambda m: [*m, m[-1]], "tensor 'hidden2.bias' sent twice"),
        (lambda m: _tensor(m, "conv2.bias").tensor.__setattr__("name", "conv3.bias"),
         "unknown tensor 'conv3.bias'"),
        (lambda m: _tensor(m, "conv1.weights").tensor.shape.__setitem__(slice(None), [32, 9]),
         "tensor 'conv1.weights': expected shape [32, 1, 3, 3], got [32, 9]"),
        (lambda m: _tensor(m, "hidden2.bias").tensor.__setattr__("data", b"\0" * 36),
         "tensor 'hidden2.bias': 36 bytes for shape [10], which needs 40 bytes"),
        (lambda m: _tensor(m, "hidden2.bias").tensor.__setattr__("data", b"\0" * 44),
         "tensor 'hidden2.bias': 44 bytes for shape [10], which holds 40 bytes"),
        (_set_nan, "layer 'conv1' bias: 1 non-finite value(s)"),
        (_swap_hidden1_slices, "slice at byte 1048576, expected byte 0"),
        (lambda m: m[0].header.__setattr__("num_tensors", 7), "announces 7 tensors but 8 arrived"),
        (lambda m: [], "empty update"),
    ],
)  # fmt: skip
def test_malformed_updates_are_refused_precisely(default_spec, mutate, message):
    with pytest.raises(MalformedUpdateError) as err:
        decode_update(_messages(default_spec, mutate), parameter_infos(default_spec))
    assert message in str(err.value)
