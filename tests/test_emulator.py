"""The TensorFlow Core ML emulator agrees with the reference interpreter and trains like Core ML."""

from __future__ import annotations

import contextlib
import io

import model_zoo
import numpy as np
import pytest

from fedcoreml.client_sim.emulator import CoreMLEmulator
from fedcoreml.ios_bridge.coremltools_quiet import (
    AdamParams,
    Model_pb2,
    NeuralNetworkBuilder,
    SgdParams,
    datatypes,
)
from fedcoreml.ios_bridge.datasets import load_bundled_sample
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.errors import TrainingConfigError, UnsupportedModelError
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.network import parse_network
from fedcoreml.ios_bridge.parameters import get_parameters, set_parameters

SPECS = {"default": lambda: build_default_model(seed=0), **model_zoo.ALL}


@pytest.fixture(scope="module")
def sample():
    return load_bundled_sample()


def _inputs(spec, images: np.ndarray) -> np.ndarray:
    shape = parse_network(spec).input_declared_shape
    return images.reshape(len(images), *shape)


@pytest.mark.parametrize("name", list(SPECS))
def test_predictions_agree_with_the_reference_interpreter(name, sample):
    spec = SPECS[name]()
    network = parse_network(spec, name)
    x = _inputs(spec, sample.x_test[:300])
    blobs = [layer.output for layer in network.layers]  # every intermediate result, too
    emulated = CoreMLEmulator(spec, name).predict(x, blobs)
    reference = ReferenceInterpreter(spec, name).predict(x, blobs)
    for blob in blobs:
        assert emulated[blob].shape == reference[blob].shape
        assert np.abs(emulated[blob] - reference[blob]).max() <= 1e-4, blob


def test_a_layout_slip_is_caught(sample, default_spec):
    """Loading Keras-style HWIO conv kernels as if they were Core ML's OIHW shows up at once."""
    slipped = Model_pb2.Model()
    slipped.CopyFrom(default_spec)
    params = dict(get_parameters(default_spec))
    hwio = params["conv2.weights"].transpose(2, 3, 1, 0)  # what Keras would hold
    params["conv2.weights"] = np.ascontiguousarray(hwio.reshape(32, 32, 2, 2))
    set_parameters(slipped, params)
    x = sample.x_test[:100]
    right = ReferenceInterpreter(default_spec).predict(x, ["conv2_out"])["conv2_out"]
    wrong = CoreMLEmulator(slipped).predict(x, ["conv2_out"])["conv2_out"]
    assert np.abs(right - wrong).max() > 1e-2


@pytest.mark.parametrize("name", list(SPECS))
def test_trained_model_written_back_scores_what_the_emulator_scored(name, sample):
    spec = SPECS[name]()
    emulator = CoreMLEmulator(spec, name)
    x_train, x_test = _inputs(spec, sample.x_train), _inputs(spec, sample.x_test)
    before = get_parameters(spec, name)
    result = emulator.train(x_train, sample.y_train, seed=0)
    assert result.num_examples == len(sample.y_train)
    assert len(result.history) == result.config.epochs
    assert [n for n, _ in result.parameters] == [n for n, _ in before]
    assert all(np.any(a != b) for (_, a), (_, b) in zip(result.parameters, before, strict=True))
    trained_spec = spec_from_bytes(spec_to_bytes(emulator.updated_spec()))
    for (_, sent), (_, written) in zip(
        result.parameters, get_parameters(trained_spec, name), strict=True
    ):
        np.testing.assert_array_equal(sent, written)
    _, emulator_accuracy = emulator.evaluate(x_test, sample.y_test)
    probabilities = result.config.loss.input
    _, reference_accuracy = ReferenceInterpreter(trained_spec, name).evaluate(
        x_test, sample.y_test, probabilities
    )
    assert reference_accuracy == emulator_accuracy
    assert reference_accuracy > 0.3  # it learned something: chance is 0.1


def test_default_model_learns_mnist(sample, default_spec):
    emulator = CoreMLEmulator(default_spec)
    emulator.train(sample.x_train, sample.y_train, epochs=2, batch_size=32, learning_rate=1e-3)
    _, accuracy = ReferenceInterpreter(emulator.updated_spec()).evaluate(
        sample.x_test, sample.y_test
    )
    assert accuracy > 0.85


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"epochs": 11}, r"epochs=11 is not allowed by the model \(allowed: \{1, 2, .*10\}\)"),
        ({"batch_size": 48}, r"batch size 48 is not allowed .*\{8, 16, 32, 64, 128, 256, 512\}"),
        ({"learning_rate": 0.5}, r"learning rate 0.5 is outside the model's allowed range"),
        ({"learning_rate": 0.0}, r"learning rate 0 is outside"),
    ],
)
def test_overrides_outside_the_spec_are_refused(override, message, sample, default_spec):
    with pytest.raises(TrainingConfigError, match=message):
        CoreMLEmulator(default_spec).train(sample.x_train[:10], sample.y_train[:10], **override)


def test_shuffle_is_seeded(sample):
    spec = model_zoo.handwritten_mlp()
    spec.neuralNetwork.updateParams.shuffle.defaultValue = True
    x = _inputs(spec, sample.x_train[:512])

    def run(seed):
        emulator = CoreMLEmulator(spec)
        return emulator.train(x, sample.y_train[:512], seed=seed).parameters

    first, again, other = run(1), run(1), run(2)
    for (_, a), (_, b) in zip(first, again, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(np.abs(a - c).max() > 1e-4 for (_, a), (_, c) in zip(first, other, strict=True))


def test_a_seed_in_the_spec_wins_over_the_callers(sample):
    spec = model_zoo.handwritten_cnn()  # sets updateParams.seed = 7
    x = _inputs(spec, sample.x_train[:256])
    a = CoreMLEmulator(spec).train(x, sample.y_train[:256], seed=1).parameters
    b = CoreMLEmulator(spec).train(x, sample.y_train[:256], seed=2).parameters
    for (_, p), (_, q) in zip(a, b, strict=True):
        np.testing.assert_allclose(p, q, atol=1e-6)


def _tiny_softmax_regression(optimizer) -> Model_pb2.Model:
    builder = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("p", datatypes.Array(3))])
    rng = np.random.default_rng(0)
    builder.add_inner_product(
        "ip", W=rng.standard_normal((3, 4)).astype(np.float32), b=np.zeros(3, np.float32),
        input_channels=4, output_channels=3, has_bias=True, input_name="x", output_name="z",
    )  # fmt: skip
    builder.add_softmax("sm", "z", "p")
    builder.make_updatable(["ip"])
    with contextlib.redirect_stdout(io.StringIO()):
        builder.set_categorical_cross_entropy_loss("ce", input="p")
    if isinstance(optimizer, SgdParams):
        builder.set_sgd_optimizer(optimizer)
    else:
        builder.set_adam_optimizer(optimizer)
    builder.set_epochs(1, [1])
    builder.spec.neuralNetwork.updateParams.shuffle.defaultValue = False
    return builder.spec


def test_one_sgd_step_is_the_mean_cross_entropy_gradient():
    sgd = SgdParams(lr=0.1, batch=8, momentum=0.0)
    sgd.set_batch(8, [8])
    spec = _tiny_softmax_regression(sgd)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    w0, b0 = (value for _, value in get_parameters(spec))
    result = CoreMLEmulator(spec).train(x, y)
    w1, b1 = (value for _, value in result.parameters)
    z = x.astype(np.float64) @ w0.T + b0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(3)[y]) / len(y)
    np.testing.assert_allclose(w1, w0 - 0.1 * delta.T @ x, atol=1e-5)
    np.testing.assert_allclose(b1, b0 - 0.1 * delta.sum(0), atol=1e-5)


def test_first_adam_step_moves_each_parameter_by_the_learning_rate():
    adam = AdamParams(lr=0.01, batch=8)
    adam.set_batch(8, [8])
    spec = _tiny_softmax_regression(adam)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w0, _ = (value for _, value in get_parameters(spec))
    result = CoreMLEmulator(spec).train(x, rng.integers(0, 3, 8))
    w1, _ = (value for _, value in result.parameters)
    # Adam's bias-corrected first step is lr * g / |g| for every weight with a gradient.
    np.testing.assert_allclose(np.abs(w1 - w0), 0.01, rtol=1e-3)


def test_non_updatable_models_predict_but_do_not_train(sample, default_spec):
    default_spec.isUpdatable = False
    emulator = CoreMLEmulator(default_spec, "frozen.mlmodel")
    assert emulator.predict(sample.x_test[:4])["output"].shape == (4, 10)
    with pytest.raises(UnsupportedModelError, match=r"frozen\.mlmodel: is not updatable"):
        emulator.train(sample.x_train[:8], sample.y_train[:8])


def test_frozen_layers_stay_frozen(sample):
    spec = model_zoo.builder_cnn()  # "stem" is not updatable
    emulator = CoreMLEmulator(spec)
    emulator.train(sample.x_train[:256], sample.y_train[:256])
    trained = dict(get_parameters(emulator.updated_spec(), include_frozen=True))
    original = dict(get_parameters(spec, include_frozen=True))
    np.testing.assert_array_equal(trained["stem.weights"], original["stem.weights"])
    assert np.any(trained["body.weights"] != original["body.weights"])
