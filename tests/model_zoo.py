"""Updatable Core ML models that fedcoreml did not make: other names, layers, layouts, optimizers.

- ``builder_cnn``: built with coremltools' NeuralNetworkBuilder, as a third-party tool would:
  5x5 'same' convolutions, stride 2, average and 'same' max pooling, tanh, CHANNEL_FIRST
  flatten, a frozen (non-updatable) first layer, SGD with momentum.
- ``handwritten_cnn``: a spec written field by field in protobuf: explicit valid padding,
  average pooling that counts padded zeros, sigmoid, CHANNEL_LAST flatten, MSE loss, Adam.
- ``handwritten_mlp``: a rank-1 input [784] multi-layer perceptron (no convolutions), Adam.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import (
    Model_pb2,
    NeuralNetworkBuilder,
    SgdParams,
    datatypes,
)

FLOAT32 = Model_pb2.ArrayFeatureType.FLOAT32


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return rng.uniform(-scale, scale, size=shape).astype(np.float32)


def builder_cnn(seed: int = 1) -> Model_pb2.Model:
    rng = np.random.default_rng(seed)
    b = NeuralNetworkBuilder(
        [("pixels", datatypes.Array(1, 28, 28))], [("classProbs", datatypes.Array(10))]
    )
    b.add_convolution(
        "stem", kernel_channels=1, output_channels=6, height=5, width=5, stride_height=1,
        stride_width=1, border_mode="same", groups=1, W=_uniform(rng, (5, 5, 1, 6), 0.3),
        b=_uniform(rng, (6,), 0.1), has_bias=True, input_name="pixels", output_name="stem_o",
    )  # fmt: skip
    b.add_activation("stem_act", "TANH", "stem_o", "stem_a")
    b.add_pooling(
        "avg", 2, 2, 2, 2, layer_type="AVERAGE", padding_type="VALID",
        input_name="stem_a", output_name="avg_o",
    )  # fmt: skip
    b.add_convolution(
        "body", kernel_channels=6, output_channels=12, height=5, width=5, stride_height=2,
        stride_width=2, border_mode="same", groups=1, W=_uniform(rng, (5, 5, 6, 12), 0.15),
        b=_uniform(rng, (12,), 0.1), has_bias=True, input_name="avg_o", output_name="body_o",
    )  # fmt: skip
    b.add_activation("body_act", "RELU", "body_o", "body_a")
    b.add_pooling(
        "maxp", 3, 3, 2, 2, layer_type="MAX", padding_type="SAME",
        input_name="body_a", output_name="maxp_o",
    )  # fmt: skip
    b.add_flatten("flat", 0, "maxp_o", "flat_o")  # CHANNEL_FIRST
    b.add_inner_product(
        "fc", W=_uniform(rng, (10, 12 * 4 * 4), 0.15), b=_uniform(rng, (10,), 0.1),
        input_channels=12 * 4 * 4, output_channels=10, has_bias=True,
        input_name="flat_o", output_name="logits",
    )  # fmt: skip
    b.add_softmax("sm", "logits", "classProbs")
    b.make_updatable(["body", "fc"])  # "stem" stays frozen, as in transfer learning
    with contextlib.redirect_stdout(io.StringIO()):
        b.set_categorical_cross_entropy_loss("xent", input="classProbs")
    sgd = SgdParams(lr=0.05, batch=16, momentum=0.9)
    sgd.set_lr(0.05, 0.0, 1.0)
    sgd.set_batch(16, [16, 32, 64])
    b.set_sgd_optimizer(sgd)
    b.set_epochs(1, [1, 2, 3, 4, 5])
    return b.spec


def _feature(description, name: str, shape: list[int], dtype=FLOAT32) -> None:
    feature = description.add()
    feature.name = name
    feature.type.multiArrayType.shape.extend(shape)
    feature.type.multiArrayType.dataType = dtype


def _weights(params, values: np.ndarray) -> None:
    params.floatValue.extend(values.ravel().tolist())
    params.isUpdatable = True


def handwritten_cnn(seed: int = 2) -> Model_pb2.Model:
    rng = np.random.default_rng(seed)
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    spec.isUpdatable = True
    _feature(spec.description.input, "img", [1, 28, 28])
    _feature(spec.description.output, "scores", [10])
    nn = spec.neuralNetwork

    conv = nn.layers.add()
    conv.name, conv.isUpdatable = "c", True
    conv.input.append("img")
    conv.output.append("c_o")
    p = conv.convolution
    p.outputChannels, p.kernelChannels, p.hasBias = 4, 1, True
    p.kernelSize.extend([3, 3])
    p.stride.extend([2, 2])
    for _ in range(2):
        amount = p.valid.paddingAmounts.borderAmounts.add()
        amount.startEdgeSize, amount.endEdgeSize = 1, 2
    _weights(p.weights, _uniform(rng, (4, 1, 3, 3), 0.4))
    _weights(p.bias, _uniform(rng, (4,), 0.1))
    # input 28 padded to 31, 3x3 stride 2 -> 15x15

    act = nn.layers.add()
    act.name = "squash"
    act.input.append("c_o")
    act.output.append("squash_o")
    act.activation.sigmoid.SetInParent()

    pool = nn.layers.add()
    pool.name = "avg_incl"
    pool.input.append("squash_o")
    pool.output.append("pool_o")
    pool.pooling.type = 1  # AVERAGE
    pool.pooling.kernelSize.extend([2, 2])
    pool.pooling.stride.extend([2, 2])
    pool.pooling.same.SetInParent()
    pool.pooling.avgPoolExcludePadding = False  # padded zeros count in the mean
    # 15x15 -> 8x8

    flat = nn.layers.add()
    flat.name = "to_vector"
    flat.input.append("pool_o")
    flat.output.append("vec")
    flat.flatten.mode = 1  # CHANNEL_LAST

    dense = nn.layers.add()
    dense.name, dense.isUpdatable = "dense", True
    dense.input.append("vec")
    dense.output.append("dense_o")
    d = dense.innerProduct
    d.inputChannels, d.outputChannels, d.hasBias = 4 * 8 * 8, 10, True
    _weights(d.weights, _uniform(rng, (10, 256), 0.2))
    _weights(d.bias, _uniform(rng, (10,), 0.1))

    soft = nn.layers.add()
    soft.name = "soft"
    soft.input.append("dense_o")
    soft.output.append("scores")
    soft.softmax.SetInParent()

    spec.description.trainingInput.extend(spec.description.input)
    _feature(spec.description.trainingInput, "scores_true", [10], Model_pb2.ArrayFeatureType.DOUBLE)
    updates = nn.updateParams
    loss = updates.lossLayers.add()
    loss.name = "mse"
    loss.meanSquaredErrorLossLayer.input = "scores"
    loss.meanSquaredErrorLossLayer.target = "scores_true"
    adam = updates.optimizer.adamOptimizer
    adam.learningRate.defaultValue = 0.01
    adam.learningRate.range.minValue, adam.learningRate.range.maxValue = 0.0, 0.1
    adam.miniBatchSize.defaultValue = 32
    adam.miniBatchSize.set.values.extend([32])
    for name, value in (("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-7)):
        getattr(adam, name).defaultValue = value
        getattr(adam, name).range.maxValue = 1.0
    updates.epochs.defaultValue = 2
    updates.epochs.range.minValue, updates.epochs.range.maxValue = 1, 20
    updates.shuffle.defaultValue = True
    updates.seed.defaultValue = 7
    return spec


def handwritten_mlp(seed: int = 3) -> Model_pb2.Model:
    rng = np.random.default_rng(seed)
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    spec.isUpdatable = True
    _feature(spec.description.input, "flat_pixels", [784])
    _feature(spec.description.output, "p", [10])
    nn = spec.neuralNetwork
    prev = "flat_pixels"
    for name, n_in, n_out in (("h", 784, 64), ("o", 64, 10)):
        layer = nn.layers.add()
        layer.name, layer.isUpdatable = name, True
        layer.input.append(prev)
        layer.output.append(f"{name}_o")
        ip = layer.innerProduct
        ip.inputChannels, ip.outputChannels, ip.hasBias = n_in, n_out, True
        _weights(ip.weights, _uniform(rng, (n_out, n_in), np.sqrt(6 / (n_in + n_out))))
        _weights(ip.bias, np.zeros(n_out, np.float32))
        prev = f"{name}_o"
        if name == "h":
            act = nn.layers.add()
            act.name = "h_relu"
            act.input.append(prev)
            act.output.append("h_a")
            act.activation.ReLU.SetInParent()
            prev = "h_a"
    soft = nn.layers.add()
    soft.name = "soft"
    soft.input.append(prev)
    soft.output.append("p")
    soft.softmax.SetInParent()
    spec.description.trainingInput.extend(spec.description.input)
    _feature(spec.description.trainingInput, "p_true", [1], Model_pb2.ArrayFeatureType.INT32)
    loss = nn.updateParams.lossLayers.add()
    loss.name = "ce"
    loss.categoricalCrossEntropyLossLayer.input = "p"
    loss.categoricalCrossEntropyLossLayer.target = "p_true"
    adam = nn.updateParams.optimizer.adamOptimizer
    adam.learningRate.defaultValue = 1e-3
    adam.learningRate.range.maxValue = 1.0
    adam.miniBatchSize.defaultValue = 32
    adam.miniBatchSize.range.minValue, adam.miniBatchSize.range.maxValue = 1, 1024
    for name, value in (("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-7)):
        getattr(adam, name).defaultValue = value
    nn.updateParams.epochs.defaultValue = 1
    nn.updateParams.epochs.set.values.extend([1, 2, 3])
    nn.updateParams.shuffle.defaultValue = False
    return spec


ALL = {"builder_cnn": builder_cnn, "handwritten_cnn": handwritten_cnn, "mlp": handwritten_mlp}
