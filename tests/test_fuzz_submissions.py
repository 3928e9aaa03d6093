"""Property-based fuzzing of the submission path: anything a client can stream is either a
valid update of exactly the model's parameters, or refused with MalformedUpdateError."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.parameters import parameter_infos
from fedcoreml.ios_bridge.tensor_codec import (
    UPDATE_REFUSALS,
    MalformedUpdateError,
    UpdateHeader,
    decode_update,
    encode_update,
)
from fedcoreml.ios_bridge.wire import device_pb2


def _tiny_spec() -> Model_pb2.Model:
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    spec.isUpdatable = True
    feature = spec.description.input.add()
    feature.name = "x"
    feature.type.multiArrayType.shape.extend([4])
    layer = spec.neuralNetwork.layers.add()
    layer.name, layer.isUpdatable = "ip", True
    layer.input.append("x")
    layer.output.append("y")
    ip = layer.innerProduct
    ip.inputChannels, ip.outputChannels, ip.hasBias = 4, 3, True
    ip.weights.floatValue.extend([0.0] * 12)
    ip.bias.floatValue.extend([0.0] * 3)
    out = spec.description.output.add()
    out.name = "y"
    out.type.multiArrayType.shape.extend([3])
    return spec


INFOS = parameter_infos(_tiny_spec())
VALID = [("ip.weights", np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
         ("ip.bias", np.array([1.5, -2.0, 0.25], np.float32))]  # fmt: skip
HEADER = UpdateHeader("s", "t", 10, 0.1, 0.5, 1.0)

names = st.sampled_from(["ip.weights", "ip.bias", "ip.weight", "", "other.bias", "ip.bias\x00"])
shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=3)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
chunk = st.builds(
    lambda name, shape, offset, values, raw: device_pb2.UpdateChunk(
        tensor=device_pb2.TensorChunk(
            name=name, shape=shape, offset=offset,
            data=np.array(values, "<f4").tobytes() + raw,
        )
    ),
    names, shapes, st.integers(min_value=0, max_value=64),
    st.lists(floats, max_size=13), st.binary(max_size=3),
)  # fmt: skip
header = st.builds(
    lambda n: device_pb2.UpdateChunk(header=device_pb2.UpdateHeader(session_id="s", task_id="t",
                                                                    num_tensors=n)),
    st.integers(min_value=0, max_value=4),
)  # fmt: skip


def _valid_stream() -> list[device_pb2.UpdateChunk]:
    return list(encode_update(HEADER, VALID, chunk_bytes=8))


def _check(messages: list[device_pb2.UpdateChunk]) -> None:
    try:
        _, parameters = decode_update(messages, INFOS)
    except MalformedUpdateError as exc:
        # refused with one of the documented reasons, on one bounded line
        assert exc.key in UPDATE_REFUSALS and str(exc).isprintable() and len(str(exc)) < 400
        return
    assert [n for n, _ in parameters] == ["ip.weights", "ip.bias"]
    for (_, value), info in zip(parameters, INFOS, strict=True):
        assert value.shape == info.shape and value.dtype == np.float32
        assert np.isfinite(value).all()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(chunk, header), max_size=8))
def test_arbitrary_streams_are_valid_or_refused(messages):
    _check(messages)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_valid_streams_are_valid_or_refused(data):
    messages = _valid_stream()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        action = data.draw(st.sampled_from(["drop", "duplicate", "swap", "replace", "corrupt"]))
        i = data.draw(st.integers(min_value=0, max_value=len(messages) - 1))
        if action == "drop" and len(messages) > 1:
            del messages[i]
        elif action == "duplicate":
            messages.insert(i, messages[i])
        elif action == "swap":
            j = data.draw(st.integers(min_value=0, max_value=len(messages) - 1))
            messages[i], messages[j] = messages[j], messages[i]
        elif action == "replace":
            messages[i] = data.draw(st.one_of(chunk, header))
        elif action == "corrupt" and messages[i].HasField("tensor"):
            raw = bytearray(messages[i].tensor.data)
            if raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
            copy = device_pb2.UpdateChunk()
            copy.CopyFrom(messages[i])
            copy.tensor.data = bytes(raw)
            messages[i] = copy
    _check(messages)


def test_the_unmutated_stream_decodes_exactly():
    _, parameters = decode_update(_valid_stream(), INFOS)
    for (_, sent), (_, got) in zip(VALID, parameters, strict=True):
        np.testing.assert_array_equal(sent, got)
