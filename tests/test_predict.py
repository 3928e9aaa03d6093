"""ios_bridge/predict.py and `fedcoreml predict`: the reference interpreter's class for a digit."""

from __future__ import annotations

import json

import model_zoo
import numpy as np
import pytest
from PIL import Image
from real_runs import trained_run

from fedcoreml.ios_bridge.coremltools_quiet import NeuralNetworkBuilder, datatypes
from fedcoreml.ios_bridge.datasets import load_bundled_sample
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import save_spec, spec_to_bytes
from fedcoreml.ios_bridge.predict import (
    ImageInputError,
    NotADigitModelError,
    Predictor,
    check_digit_model,
    load_image,
    predict,
    takes_digit_image,
)
from fedcoreml.server.cli import main

SAMPLE = load_bundled_sample()


def digit(index: int) -> np.ndarray:
    """A test digit of the bundled sample as MNIST stores it: uint8 [28, 28], white on black."""
    return np.round(SAMPLE.x_test[index, 0] * 255).astype(np.uint8)


def paper(image: np.ndarray, side: int) -> np.ndarray:
    """The digit as a scan or a drawing: dark ink on white, ``side`` x ``side`` pixels."""
    inverted = Image.fromarray(255 - image)
    return np.asarray(inverted.resize((side, side), Image.Resampling.BICUBIC))


def interpreter_answer(spec, image: np.ndarray) -> np.ndarray:
    batch = image.astype(np.float32).reshape(1, 1, 28, 28) / 255.0
    return ReferenceInterpreter(spec).predict(batch)["output"][0]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    return save_spec(build_default_model(seed=0), tmp_path_factory.mktemp("m") / "lenet.mlmodel")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("trained") / "run") / "final.mlmodel"


def test_the_prediction_is_the_reference_interpreter_s_on_the_same_input(default_model):
    spec = build_default_model(seed=0)
    for index in range(5):
        expected = interpreter_answer(spec, digit(index))
        result = predict(default_model, digit(index))
        assert result.label == str(int(np.argmax(expected)))
        assert list(result.probabilities) == [str(i) for i in range(10)]
        np.testing.assert_allclose(list(result.probabilities.values()), expected, rtol=1e-6)
        np.testing.assert_array_equal(result.image, SAMPLE.x_test[index, 0])


def test_model_bytes_path_and_spec_give_the_same_answer(default_model):
    spec = build_default_model(seed=0)
    answers = [
        predict(m, digit(3)).probabilities for m in (default_model, spec_to_bytes(spec), spec)
    ]
    assert answers[0] == answers[1] == answers[2]


def test_png_and_npy_inputs_agree(tmp_path, default_model):
    image = digit(7)
    Image.fromarray(image).save(tmp_path / "seven.png")
    np.save(tmp_path / "seven.npy", image)
    np.save(tmp_path / "seven_float.npy", image.astype(np.float32) / 255.0)
    seen = [load_image(tmp_path / name) for name in ("seven.png", "seven.npy", "seven_float.npy")]
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_allclose(seen[0], seen[2], atol=1e-7)
    png = predict(default_model, tmp_path / "seven.png")
    assert png.probabilities == predict(default_model, tmp_path / "seven.npy").probabilities
    assert (
        png.probabilities
        == predict(default_model, (tmp_path / "seven.png").read_bytes()).probabilities
    )


def test_a_large_drawing_on_paper_becomes_an_mnist_style_digit(tmp_path):
    drawing = paper(digit(0), 280)
    rgba = np.dstack([np.zeros_like(drawing)] * 3 + [255 - drawing])  # black ink, clear page
    Image.fromarray(rgba).save(tmp_path / "drawn.png")
    images = [load_image(s) for s in (drawing, rgba, tmp_path / "drawn.png")]  # grey, canvas, PNG
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])
    for seen in images:
        assert seen.shape == (28, 28) and seen.dtype == np.float32
        assert seen.min() >= 0.0 and seen.max() <= 1.0
        assert seen[0].max() == seen[-1].max() == 0.0  # white on black, border empty
        ink = np.argwhere(seen > 0.1)
        height, width = ink.max(axis=0) - ink.min(axis=0) + 1
        assert max(height, width) in (20, 21)  # fitted to 20x20 (plus a faint resampled edge)
        centre = (np.indices(seen.shape) * seen).sum(axis=(1, 2)) / seen.sum()
        np.testing.assert_allclose(centre, [13.5, 13.5], atol=0.6)


def test_a_blank_drawing_is_a_blank_input():
    assert not load_image(np.full((100, 100), 255, dtype=np.uint8)).any()


def test_a_flat_784_input_model_is_fed_row_by_row():
    spec = model_zoo.handwritten_mlp()
    assert takes_digit_image(spec)
    flat = SAMPLE.x_test[:1].reshape(1, 784)
    expected = ReferenceInterpreter(spec).predict(flat)["p"][0]
    result = predict(spec, digit(0))
    np.testing.assert_allclose(list(result.probabilities.values()), expected, rtol=1e-6)


def small_colour_model():
    builder = NeuralNetworkBuilder(
        [("photo", datatypes.Array(3, 8, 8))], [("probs", datatypes.Array(4))]
    )
    builder.add_flatten("flat", 0, "photo", "flat_o")
    builder.add_inner_product(
        "fc", W=np.zeros((4, 192), np.float32), b=np.zeros(4, np.float32), input_channels=192,
        output_channels=4, has_bias=True, input_name="flat_o", output_name="logits",
    )  # fmt: skip
    builder.add_softmax("sm", "logits", "probs")
    return builder.spec


def test_a_model_that_does_not_take_a_digit_is_told_plainly(tmp_path, capsys):
    spec = small_colour_model()
    assert not takes_digit_image(spec)
    with pytest.raises(NotADigitModelError, match=r"input 'photo' has shape \[3, 8, 8\]; predict"):
        check_digit_model(spec)
    path = save_spec(spec, tmp_path / "colour.mlmodel")
    np.save(tmp_path / "x.npy", digit(0))
    assert main(["predict", "--model", str(path), str(tmp_path / "x.npy")]) == 2
    error = capsys.readouterr().err
    assert "fedcoreml predict: error:" in error and "takes a 28x28 grey image" in error


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "x.txt", (d / "x.txt").write_text("7")), r"x.txt: expected a .png or .npy"),
        (lambda d: (d / "x.png", (d / "x.png").write_bytes(b"not a png")),
         r"x.png: not a readable PNG image"),
        (lambda d: (d / "x.png", Image.new("L", (28, 28)).save(d / "x.png", format="JPEG")),
         r"x.png: a JPEG image; expected a PNG"),
        (lambda d: (d / "x.npy", np.save(d / "x.npy", np.full((28, 28), 3.0))),
         r"x.npy: float pixels must lie in 0..1"),
        (lambda d: (d / "x.npy", np.save(d / "x.npy", np.zeros((2, 28, 28), np.uint8))),
         r"x.npy: an array of shape \[2, 28, 28\]; expected a grey image"),
        (lambda d: (d / "x.npy", (d / "x.npy").write_bytes(b"junk")), r"x.npy: not a .npy"),
    ],
    ids=["suffix", "not-png", "jpeg", "float-range", "batch", "not-npy"],
)  # fmt: skip
def test_bad_input_is_named(tmp_path, default_model, make, message):
    path, _ = make(tmp_path)
    with pytest.raises(ImageInputError, match=message):
        predict(default_model, path)


def test_the_command_prints_the_class_and_probabilities(tmp_path, default_model, capsys):
    np.save(tmp_path / "four.npy", digit(4))
    expected = predict(default_model, digit(4))
    assert main(["predict", "--model", str(default_model), str(tmp_path / "four.npy")]) == 0
    text = capsys.readouterr().out
    assert f"class {expected.label} (probability {expected.confidence:.4f})" in text
    assert all(f"{p:.4f}" in text for p in expected.probabilities.values())
    assert (
        main(["predict", "--model", str(default_model), "--json", str(tmp_path / "four.npy")]) == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["label"] == expected.label
    assert answer["probabilities"] == pytest.approx(expected.probabilities)
    np.testing.assert_allclose(answer["image"], SAMPLE.x_test[4, 0], atol=1e-6)


@pytest.mark.slow  # a federated run with TensorFlow devices (~15 s)
def test_a_trained_model_reads_the_sample_s_digits(trained_model):
    predictor = Predictor(trained_model)
    interpreter = ReferenceInterpreter(predictor.spec)
    count = 100
    expected = interpreter.predict(SAMPLE.x_test[:count])["output"].argmax(axis=1)
    labels = np.array([int(predictor.predict(digit(i)).label) for i in range(count)])
    np.testing.assert_array_equal(labels, expected)  # the interpreter's class, every time
    assert (labels == SAMPLE.y_test[:count]).mean() >= 0.7  # and the model has learned
    # the same digits drawn large, dark on white, are fitted back and mostly read the same
    on_paper = np.array([int(predictor.predict(paper(digit(i), 200)).label) for i in range(count)])
    assert (on_paper == SAMPLE.y_test[:count]).mean() >= 0.6
