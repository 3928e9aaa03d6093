"""The reference interpreter against direct, loop-by-loop definitions of each operation."""

from __future__ import annotations

import numpy as np
import pytest

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import ParameterError
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter


def _spec(shape, build_layers) -> Model_pb2.Model:
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    feature = spec.description.input.add()
    feature.name = "x"
    feature.type.multiArrayType.shape.extend(shape)
    feature.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.FLOAT32
    out_name = build_layers(spec.neuralNetwork)
    out = spec.description.output.add()
    out.name = out_name
    out.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.FLOAT32
    return spec


def _naive_conv(x, w, b, stride, pads):
    x = np.pad(x, ((0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    out_c, _, kh, kw = w.shape
    ho = (x.shape[1] - kh) // stride[0] + 1
    wo = (x.shape[2] - kw) // stride[1] + 1
    y = np.zeros((out_c, ho, wo), np.float64)
    for o in range(out_c):
        for i in range(ho):
            for j in range(wo):
                patch = x[:, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw]
                y[o, i, j] = (patch * w[o]).sum() + b[o]
    return y


@pytest.mark.parametrize(
    ("padding", "stride", "expected_pads"),
    [
        ("valid", (1, 1), (0, 0, 0, 0)),
        ("same", (2, 2), (1, 2, 1, 2)),
        ("same", (1, 1), (1, 2, 1, 2)),
    ],
)
def test_convolution(padding, stride, expected_pads):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)

    def layers(nn):
        layer = nn.layers.add()
        layer.name = "conv"
        layer.input.append("x")
        layer.output.append("y")
        p = layer.convolution
        p.outputChannels, p.kernelChannels, p.hasBias = 3, 2, True
        p.kernelSize.extend([4, 4])
        p.stride.extend(stride)
        if padding == "same":
            p.same.SetInParent()
        else:
            p.valid.SetInParent()
        p.weights.floatValue.extend(w.ravel())
        p.bias.floatValue.extend(b)
        return "y"

    x = rng.standard_normal((2, 2, 9, 9)).astype(np.float32)
    got = ReferenceInterpreter(_spec([2, 9, 9], layers)).predict(x)["y"]
    # "same" keeps ceil(9 / stride) outputs; a 4-wide kernel needs 3 pads: 1 top/left and the
    # odd one bottom/right (Core ML's BOTTOM_RIGHT_HEAVY, TensorFlow's rule too).
    expected_size = -(-9 // stride[0]) if padding == "same" else 6
    assert got.shape[2:] == (expected_size, expected_size)
    for n in range(2):
        np.testing.assert_allclose(
            got[n], _naive_conv(x[n], w, b, stride, expected_pads), atol=1e-4
        )


@pytest.mark.parametrize(
    ("kind", "padding", "exclude", "expected"),
    [
        ("max", "valid", True, [[5, 7], [13, 15]]),
        ("average", "valid", True, [[2.5, 4.5], [10.5, 12.5]]),
        # 3x3 windows, stride 2, "same" on 4x4: pads (0, 1) each way
        ("max", "same", True, [[10, 11], [14, 15]]),
        ("average", "same", True, [[5, 6.5], [11, 12.5]]),
        ("average", "same", False, [[5, 13 / 3], [22 / 3, 50 / 9]]),
    ],
)
def test_pooling(kind, padding, exclude, expected):
    window = 2 if padding == "valid" else 3

    def layers(nn):
        layer = nn.layers.add()
        layer.name = "pool"
        layer.input.append("x")
        layer.output.append("y")
        p = layer.pooling
        p.type = 0 if kind == "max" else 1
        p.kernelSize.extend([window, window])
        p.stride.extend([2, 2])
        (p.same if padding == "same" else p.valid).SetInParent()
        p.avgPoolExcludePadding = exclude
        return "y"

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    got = ReferenceInterpreter(_spec([1, 4, 4], layers)).predict(x)["y"]
    np.testing.assert_allclose(got[0, 0], np.array(expected), rtol=1e-6)


@pytest.mark.parametrize(("mode", "order"), [(0, (0, 1, 2)), (1, (1, 2, 0))])
def test_flatten_orders(mode, order):
    def layers(nn):
        layer = nn.layers.add()
        layer.name = "flat"
        layer.input.append("x")
        layer.output.append("y")
        layer.flatten.mode = mode
        return "y"

    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)  # C, H, W
    got = ReferenceInterpreter(_spec([2, 3, 4], layers)).predict(x)["y"]
    np.testing.assert_array_equal(got[0], x[0].transpose(order).ravel())


def test_inner_product_activation_and_softmax():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)

    def layers(nn):
        ip = nn.layers.add()
        ip.name = "ip"
        ip.input.append("x")
        ip.output.append("h")
        ip.innerProduct.inputChannels, ip.innerProduct.outputChannels = 6, 4
        ip.innerProduct.hasBias = True
        ip.innerProduct.weights.floatValue.extend(w.ravel())
        ip.innerProduct.bias.floatValue.extend(b)
        act = nn.layers.add()
        act.name = "act"
        act.input.append("h")
        act.output.append("a")
        act.activation.tanh.SetInParent()
        sm = nn.layers.add()
        sm.name = "sm"
        sm.input.append("a")
        sm.output.append("p")
        sm.softmax.SetInParent()
        return "p"

    x = rng.standard_normal((5, 6)).astype(np.float32)
    got = ReferenceInterpreter(_spec([6], layers)).predict(x)["p"]
    a = np.tanh(x.astype(np.float64) @ w.T + b)
    expected = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_wrong_input_shape_is_named(default_spec):
    with pytest.raises(ParameterError, match=r"expects examples of shape \[1, 28, 28\]"):
        ReferenceInterpreter(default_spec).predict(np.zeros((2, 28, 28), np.float32))
