"""Reading and writing updatable parameters: names, Core ML layout, validation, atomicity."""

from __future__ import annotations

import numpy as np
import pytest

from fedcoreml.ios_bridge.errors import ParameterError
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.parameters import get_parameters, parameter_infos, set_parameters

EXPECTED = [
    ("conv1.weights", (32, 1, 3, 3)),
    ("conv1.bias", (32,)),
    ("conv2.weights", (32, 32, 2, 2)),
    ("conv2.bias", (32,)),
    ("hidden1.weights", (500, 1152)),
    ("hidden1.bias", (500,)),
    ("hidden2.weights", (10, 500)),
    ("hidden2.bias", (10,)),
]


def test_names_shapes_and_order(default_spec):
    params = get_parameters(default_spec)
    assert [(name, value.shape) for name, value in params] == EXPECTED
    assert all(value.dtype == np.float32 for _, value in params)


def test_written_parameters_are_in_the_serialized_model(default_spec):
    rng = np.random.default_rng(0)
    new = [(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in EXPECTED]
    set_parameters(default_spec, new)
    reread = get_parameters(spec_from_bytes(spec_to_bytes(default_spec)))
    for (name, sent), (name_back, got) in zip(new, reread, strict=True):
        assert name == name_back
        np.testing.assert_array_equal(sent, got)
    # still updatable after the rewrite
    layer = default_spec.neuralNetwork.layers[0]
    assert layer.isUpdatable and layer.convolution.weights.isUpdatable


def test_conv_weights_are_core_ml_oihw(default_spec):
    # A conv1 kernel with a single 1 at (out=5, in=0, row=0, col=2) must shift the image:
    # output channel 5 at (i, j) equals input at (i, j + 2).
    params = dict(get_parameters(default_spec))
    kernel = np.zeros((32, 1, 3, 3), np.float32)
    kernel[5, 0, 0, 2] = 1.0
    params["conv1.weights"] = kernel
    set_parameters(default_spec, params)
    image = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    conv = ReferenceInterpreter(default_spec).predict(image, ["conv1_out"])["conv1_out"]
    np.testing.assert_allclose(conv[0, 5], image[0, 0, :26, 2:28], atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop("hidden2.bias"), "missing parameter(s): hidden2.bias"),
        (lambda p: p.__setitem__("hidden3.weights", np.zeros((1,), np.float32)),
         "unknown parameter(s) hidden3.weights"),
        (lambda p: p.__setitem__("hidden1.weights", np.zeros((1152, 500), np.float32)),
         "layer 'hidden1' weights: expected shape [500, 1152], got [1152, 500]"),
        (lambda p: p.__setitem__("conv1.bias", np.zeros(32, np.float64)),
         "layer 'conv1' bias: expected dtype float32, got float64"),
        (lambda p: p["conv2.weights"].__setitem__((0, 0, 0, 0), np.nan),
         "layer 'conv2' weights: 1 non-finite value(s)"),
        (lambda p: p["hidden2.weights"].__setitem__((3, 3), np.inf),
         "layer 'hidden2' weights: 1 non-finite value(s)"),
        (lambda p: p.__setitem__("conv1.bias", [0.0] * 32),
         "layer 'conv1' bias: expected a numpy float32 array, got list"),
    ],
)  # fmt: skip
def test_bad_parameters_are_rejected_and_nothing_is_written(default_spec, change, message):
    before = spec_to_bytes(default_spec)
    params = {name: value.copy() + 1 for name, value in get_parameters(default_spec)}
    change(params)
    with pytest.raises(ParameterError) as err:
        set_parameters(default_spec, params)
    assert message in str(err.value)
    assert spec_to_bytes(default_spec) == before


def test_duplicate_names_are_rejected(default_spec):
    params = get_parameters(default_spec)
    with pytest.raises(ParameterError, match=r"duplicate parameter names: conv1\.bias"):
        set_parameters(default_spec, [*params, params[1]])


def test_frozen_layers_are_not_parameters():
    import model_zoo

    spec = model_zoo.builder_cnn()
    assert [info.name for info in parameter_infos(spec)] == [
        "body.weights", "body.bias", "fc.weights", "fc.bias",
    ]  # fmt: skip
    assert [i.name for i in parameter_infos(spec, include_frozen=True)][:2] == [
        "stem.weights", "stem.bias",
    ]  # fmt: skip


def test_a_stripped_model_plus_its_parameters_is_the_model_again(default_spec):
    from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
    from fedcoreml.ios_bridge.parameters import fill_parameters, strip_parameters

    params = get_parameters(default_spec)
    bare = strip_parameters(default_spec)
    assert len(spec_to_bytes(bare)) < 10_000 < len(spec_to_bytes(default_spec))
    rebuilt = fill_parameters(bare, [(n, v.astype(np.float64)) for n, v in params])
    assert spec_to_bytes(rebuilt) == spec_to_bytes(default_spec)
    with pytest.raises(ParameterError, match=r"do not complete the model.*hidden2"):
        fill_parameters(bare, params[:-1])
    with pytest.raises(ParameterError, match="no layer 'conv9'"):
        fill_parameters(bare, [*params[:-1], ("conv9.bias", params[-1][1])])
