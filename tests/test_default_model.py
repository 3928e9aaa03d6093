"""The default model is exactly the seed LeNet, updatable, with the documented training setup."""

from __future__ import annotations

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.model_info import describe
from fedcoreml.ios_bridge.network import parse_network
from fedcoreml.ios_bridge.parameters import count_parameters, get_parameters
from fedcoreml.ios_bridge.update_params import parse_update_params


def test_structure_matches_the_seed_model(default_spec):
    network = parse_network(default_spec)
    layers = [
        (type(layer).__name__, layer.name, layer.input_shape, layer.output_shape)
        for layer in network.layers
    ]
    assert layers == [
        ("Convolution", "conv1", (1, 28, 28), (32, 26, 26)),
        ("Activation", "relu1", (32, 26, 26), (32, 26, 26)),
        ("Pooling", "pool1", (32, 26, 26), (32, 13, 13)),
        ("Convolution", "conv2", (32, 13, 13), (32, 12, 12)),
        ("Activation", "relu2", (32, 12, 12), (32, 12, 12)),
        ("Pooling", "pool2", (32, 12, 12), (32, 6, 6)),
        ("Flatten", "flatten", (32, 6, 6), (1152, 1, 1)),
        ("InnerProduct", "hidden1", (1152, 1, 1), (500, 1, 1)),
        ("Activation", "relu3", (500, 1, 1), (500, 1, 1)),
        ("InnerProduct", "hidden2", (500, 1, 1), (10, 1, 1)),
        ("Softmax", "softmax", (10, 1, 1), (10, 1, 1)),
    ]
    conv1, conv2 = network.layers[0], network.layers[3]
    assert (conv1.kernel, conv1.padding, conv1.has_bias) == ((3, 3), "valid", True)
    assert (conv2.kernel, conv2.padding, conv2.has_bias) == ((2, 2), "valid", True)
    pools = [network.layers[2], network.layers[5]]
    assert all((p.kind, p.kernel, p.stride) == ("max", (2, 2), (2, 2)) for p in pools)
    assert network.layers[6].order == "channel_last"
    assert all(network.layers[i].function == "relu" for i in (1, 4, 8))
    assert [layer.name for layer in network.trainable_layers] == [
        "conv1", "conv2", "hidden1", "hidden2",
    ]  # fmt: skip
    assert count_parameters(default_spec) == 585_958


def test_features_loss_and_optimizer(default_spec):
    assert default_spec.specificationVersion >= 4 and default_spec.isUpdatable
    assert default_spec.WhichOneof("Type") == "neuralNetwork"
    info = describe(default_spec)
    float32 = "float32"
    assert info["inputs"] == [
        {"name": "image", "type": "multiArray", "dtype": float32, "shape": [1, 28, 28],
         "description": info["inputs"][0]["description"]}
    ]  # fmt: skip
    assert [(o["name"], o["dtype"], o["shape"]) for o in info["outputs"]] == [
        ("output", float32, [10])
    ]
    target = next(f for f in info["training_inputs"] if f["name"] == "output_true")
    assert (target["dtype"], target["shape"]) == ("int32", [1])

    update = parse_update_params(default_spec, parse_network(default_spec))
    assert (update.loss.kind, update.loss.input, update.loss.target) == (
        "categorical_cross_entropy", "output", "output_true",
    )  # fmt: skip
    assert update.optimizer.kind == "adam"
    assert update.optimizer.learning_rate.default == 1e-4
    assert update.optimizer.learning_rate.maximum >= 0.3
    assert update.optimizer.batch_size.default == 128
    assert {16, 32, 64, 128, 256} <= set(update.optimizer.batch_size.allowed_set)
    assert update.epochs.default == 1
    assert set(range(1, 11)) <= set(update.epochs.allowed_set)
    assert update.shuffle


def test_glorot_uniform_initialisation_is_seeded(default_spec):
    params = dict(get_parameters(default_spec))
    fans = {"conv1": (9, 9 * 32), "conv2": (4 * 32, 4 * 32), "hidden1": (1152, 500),
            "hidden2": (500, 10)}  # fmt: skip
    for layer, (fan_in, fan_out) in fans.items():
        w = params[f"{layer}.weights"]
        limit = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit
        # a uniform distribution on [-limit, limit] has standard deviation limit / sqrt(3)
        assert abs(w.std() - limit / np.sqrt(3)) < 0.1 * limit
        assert not params[f"{layer}.bias"].any()
    again = spec_to_bytes(build_default_model(seed=0))
    assert again == spec_to_bytes(default_spec)
    assert spec_to_bytes(build_default_model(seed=1)) != again


def test_spec_is_a_plain_core_ml_model(default_spec):
    # The serialized bytes parse back as a Core ML Model with the same content.
    back = Model_pb2.Model.FromString(spec_to_bytes(default_spec))
    assert back == default_spec
