"""The reference model: the on-device training article's updatable MNIST LeNet (585,958 params).

image [1,28,28] -> conv1 3x3 1->32 -> ReLU -> maxpool 2 -> conv2 2x2 32->32 -> ReLU
-> maxpool 2 -> flatten (CHANNEL_LAST, 1152) -> hidden1 1152->500 -> ReLU -> hidden2 500->10
-> softmax -> output.
Trained with categorical cross-entropy against ``output_true`` and Adam (lr 1e-4, batch 128).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import (
    AdamParams,
    Model_pb2,
    NeuralNetworkBuilder,
    datatypes,
)

INPUT_NAME = "image"
OUTPUT_NAME = "output"
TARGET_NAME = "output_true"
NUM_CLASSES = 10
UPDATABLE_LAYERS = ("conv1", "conv2", "hidden1", "hidden2")
ALLOWED_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
ALLOWED_EPOCHS = tuple(range(1, 11))
LEARNING_RATE = 1e-4
LEARNING_RATE_RANGE = (1e-6, 0.3)
BATCH_SIZE = 128
EPOCHS = 1
SHORT_DESCRIPTION = "fedcoreml MNIST LeNet (updatable): 28x28 grayscale digit, pixels 0..1"


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int):
    """Keras' Glorot-uniform initialiser: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def build_default_model(seed: int = 0) -> Model_pb2.Model:
    """Build the updatable reference model with Glorot-uniform weights and zero biases."""
    rng = np.random.default_rng(seed)
    builder = NeuralNetworkBuilder(
        [(INPUT_NAME, datatypes.Array(1, 28, 28))],
        [(OUTPUT_NAME, datatypes.Array(NUM_CLASSES))],
    )

    def conv(name: str, inp: str, out: str, k: int, c_in: int, c_out: int) -> None:
        # The builder takes convolution weights as [kH, kW, kC, outC] and stores them in Core ML's
        # [outC, kC, kH, kW]; receptive-field fans as Keras computes them.
        w = glorot_uniform(rng, (k, k, c_in, c_out), k * k * c_in, k * k * c_out)
        builder.add_convolution(
            name=name, kernel_channels=c_in, output_channels=c_out, height=k, width=k,
            stride_height=1, stride_width=1, border_mode="valid", groups=1,
            W=w, b=np.zeros(c_out, np.float32), has_bias=True,
            input_name=inp, output_name=out,
        )  # fmt: skip

    def dense(name: str, inp: str, out: str, n_in: int, n_out: int) -> None:
        w = glorot_uniform(rng, (n_out, n_in), n_in, n_out)
        builder.add_inner_product(
            name=name, W=w, b=np.zeros(n_out, np.float32), input_channels=n_in,
            output_channels=n_out, has_bias=True, input_name=inp, output_name=out,
        )  # fmt: skip

    def maxpool(name: str, inp: str, out: str) -> None:
        builder.add_pooling(
            name=name, height=2, width=2, stride_height=2, stride_width=2, layer_type="MAX",
            padding_type="VALID", input_name=inp, output_name=out,
        )  # fmt: skip

    conv("conv1", INPUT_NAME, "conv1_out", 3, 1, 32)
    builder.add_activation("relu1", "RELU", "conv1_out", "relu1_out")
    maxpool("pool1", "relu1_out", "pool1_out")
    conv("conv2", "pool1_out", "conv2_out", 2, 32, 32)
    builder.add_activation("relu2", "RELU", "conv2_out", "relu2_out")
    maxpool("pool2", "relu2_out", "pool2_out")
    builder.add_flatten("flatten", 1, "pool2_out", "flatten_out")  # mode 1 = CHANNEL_LAST
    dense("hidden1", "flatten_out", "hidden1_out", 32 * 6 * 6, 500)
    builder.add_activation("relu3", "RELU", "hidden1_out", "relu3_out")
    dense("hidden2", "relu3_out", "hidden2_out", 500, NUM_CLASSES)
    builder.add_softmax("softmax", "hidden2_out", OUTPUT_NAME)

    builder.make_updatable(list(UPDATABLE_LAYERS))
    with contextlib.redirect_stdout(io.StringIO()):  # the builder prints a notice here
        builder.set_categorical_cross_entropy_loss(name="loss", input=OUTPUT_NAME)
    adam = AdamParams(lr=LEARNING_RATE, batch=BATCH_SIZE)
    adam.set_lr(LEARNING_RATE, *LEARNING_RATE_RANGE)
    adam.set_batch(BATCH_SIZE, list(ALLOWED_BATCH_SIZES))
    builder.set_adam_optimizer(adam)
    builder.set_epochs(EPOCHS, list(ALLOWED_EPOCHS))

    spec = builder.spec
    float32 = Model_pb2.ArrayFeatureType.FLOAT32
    for feature in (*spec.description.input, *spec.description.output):
        feature.type.multiArrayType.dataType = float32
    for feature in spec.description.trainingInput:
        if feature.name == INPUT_NAME:
            feature.type.multiArrayType.dataType = float32
    spec.description.input[
        0
    ].shortDescription = "grayscale digit, [1, 28, 28], pixels scaled to 0..1"
    spec.description.output[0].shortDescription = "class probabilities for digits 0-9"
    spec.description.metadata.shortDescription = SHORT_DESCRIPTION
    spec.description.metadata.author = "fedcoreml"
    spec.description.metadata.userDefined["fedcoreml.init_seed"] = str(seed)
    return spec
