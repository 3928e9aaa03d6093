"""Inspecting models, and clear refusals for models fedcoreml cannot train."""

from __future__ import annotations

import model_zoo
import pytest

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import ModelFormatError, UnsupportedModelError
from fedcoreml.ios_bridge.mlmodel_io import load_spec, save_spec, spec_from_bytes
from fedcoreml.ios_bridge.model_info import describe, require_trainable


def test_describe_lists_every_layer_and_the_training_setup(default_spec):
    info = describe(default_spec, "m.mlmodel")
    assert info["trainable"] and info["problem"] is None
    assert info["total_parameters"] == info["trainable_parameters"] == 585_958
    assert [(layer["name"], layer["type"], layer["parameters"]) for layer in info["layers"]] == [
        ("conv1", "convolution", 320), ("relu1", "activation", 0), ("pool1", "pooling", 0),
        ("conv2", "convolution", 4128), ("relu2", "activation", 0), ("pool2", "pooling", 0),
        ("flatten", "flatten", 0), ("hidden1", "innerProduct", 576_500),
        ("relu3", "activation", 0), ("hidden2", "innerProduct", 5010),
        ("softmax", "softmax", 0),
    ]  # fmt: skip
    assert info["layers"][6]["output_shape"] == [1152, 1, 1]
    assert info["optimizer"]["type"] == "adam"
    assert info["optimizer"]["learning_rate"] == {"default": 1e-4, "min": 1e-6, "max": 0.3}
    assert info["optimizer"]["batch_size"]["default"] == 128
    assert info["epochs"] == {"default": 1, "allowed": list(range(1, 11))}
    assert info["loss"]["target"] == "output_true"


@pytest.mark.parametrize("name", list(model_zoo.ALL))
def test_models_from_other_tools_are_trainable(name):
    info = describe(model_zoo.ALL[name](), name)
    assert info["trainable"], info["problem"]


def _with_batchnorm(spec: Model_pb2.Model) -> Model_pb2.Model:
    layer = spec.neuralNetwork.layers[1]
    layer.ClearField("activation")
    layer.name = "bn1"
    layer.batchnorm.channels = 32
    return spec


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s, "isUpdatable", False), "m.mlmodel: is not updatable"),
        (_with_batchnorm, "m.mlmodel: layer 'bn1' is of type 'batchnorm', which fedcoreml's "
                          "emulator does not implement"),
        (lambda s: s.neuralNetwork.layers[2].pooling.globalPooling is None
         or setattr(s.neuralNetwork.layers[2].pooling, "globalPooling", True),
         "m.mlmodel: layer 'pool1': global pooling is not supported"),
        (lambda s: s.neuralNetwork.layers[1].activation.ClearField("ReLU")
         or s.neuralNetwork.layers[1].activation.leakyReLU.SetInParent(),
         "m.mlmodel: layer 'relu1': activation 'leakyReLU' is not supported"),
        (lambda s: s.neuralNetwork.updateParams.ClearField("optimizer"),
         "m.mlmodel: no optimizer"),
        (lambda s: s.neuralNetwork.layers[0].convolution.weights.ClearField("floatValue")
         or s.neuralNetwork.layers[0].convolution.weights.__setattr__("float16Value", b"\0" * 576),
         "layer 'conv1': weights are stored as float16"),
    ],
)  # fmt: skip
def test_out_of_scope_models_are_named_with_their_layer(default_spec, mutate, message):
    mutate(default_spec)
    with pytest.raises(UnsupportedModelError) as err:
        require_trainable(default_spec, "m.mlmodel")
    assert message in str(err.value)
    info = describe(default_spec, "m.mlmodel")
    assert not info["trainable"] and message in info["problem"]
    assert len(info["layers"]) == 11  # still listed


def test_a_model_that_is_not_a_neural_network():
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    spec.glmRegressor.offset.append(0.0)
    with pytest.raises(UnsupportedModelError, match=r"glm\.mlmodel: is a 'glmRegressor' model"):
        require_trainable(spec, "glm.mlmodel")
    assert describe(spec, "glm.mlmodel")["model_type"] == "glmRegressor"


def test_unreadable_files(tmp_path, default_spec):
    with pytest.raises(ModelFormatError, match="no such model file"):
        load_spec(tmp_path / "missing.mlmodel")
    garbage = tmp_path / "garbage.mlmodel"
    garbage.write_bytes(b"\xff\xfe this is not a protobuf")
    with pytest.raises(ModelFormatError, match=r"garbage\.mlmodel: not a Core ML \.mlmodel"):
        load_spec(garbage)
    with pytest.raises(ModelFormatError, match="empty"):
        spec_from_bytes(b"", "upload")
    saved = save_spec(default_spec, tmp_path / "sub" / "ok.mlmodel")
    assert load_spec(saved) == default_spec
    assert [p.name for p in saved.parent.iterdir()] == ["ok.mlmodel"]  # no temporary left
