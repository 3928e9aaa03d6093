"""Predict with a ``.mlmodel``: the reference interpreter on the exact model bytes, on one image.

:func:`predict` takes a model (bytes, a path, or a parsed spec) and an image (a PNG or ``.npy``
file, PNG bytes, or an array) and returns a :class:`Prediction`: the class label, the
probability of every class label, and the 28x28 input as the model saw it. For many images with
one model, build a :class:`Predictor` once.

Images are made to look like the training data (see datasets.py): 28x28, one grey channel,
float32 in 0..1, a white digit on black. So an image is

* made grey (colour averaged by luminance; a transparent background counts as white paper);
* inverted when it is dark ink on light paper (its border is brighter than mid-grey);
* if it is not 28x28 already, fitted as MNIST's digits were: the ink's bounding box scaled,
  keeping its aspect, to fit 20x20, then placed in the 28x28 frame with its centre of mass at
  the centre. A 28x28 image is taken as it is.

Only models whose one input is a 28x28 grey image ([1, 28, 28], or [784] flattened row by row,
as the devices feed such a model) and whose one output holds class probabilities can be asked;
:func:`check_digit_model` says why another model cannot.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import load_spec, spec_from_bytes
from fedcoreml.ios_bridge.network import parse_network

__all__ = [
    "IMAGE_SIDE",
    "ImageInputError",
    "NotADigitModelError",
    "Prediction",
    "Predictor",
    "check_digit_model",
    "load_image",
    "predict",
    "prepare_image",
    "takes_digit_image",
]

IMAGE_SIDE = 28
_DIGIT_BOX = 20  # MNIST's digits were scaled to fit 20x20, then centred in 28x28
_INK_THRESHOLD = 0.1  # a pixel this bright (after inversion) is ink, for the bounding box
_DIGIT_INPUT_SHAPES = ((1, IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE * IMAGE_SIDE,))

ModelSource = bytes | str | os.PathLike[str] | Model_pb2.Model
ImageSource = str | os.PathLike[str] | bytes | np.ndarray


class NotADigitModelError(FedCoreMLError):
    """The model does not take a 28x28 grey image, or does not output class probabilities."""


class ImageInputError(FedCoreMLError):
    """An image that cannot be read, or cannot be made into the model's 28x28 input."""


@dataclass(frozen=True)
class Prediction:
    """What the model made of one image.

    ``label``: the most probable class label; ``probabilities``: every class label's probability,
    in the model's class order; ``image``: float32 [28, 28] in 0..1, the input as the model saw it.
    """

    label: str
    probabilities: dict[str, float]
    image: np.ndarray = field(repr=False)

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form: label, probabilities, and the 28x28 input as rows of numbers."""
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "image": [[round(float(v), 6) for v in row] for row in self.image],
        }


def takes_digit_image(spec: Model_pb2.Model, model_name: str = "model") -> bool:
    """Whether the model takes a 28x28 grey image and outputs class probabilities."""
    try:
        check_digit_model(spec, model_name)
    except FedCoreMLError:
        return False
    return True


def check_digit_model(spec: Model_pb2.Model, model_name: str = "model") -> None:
    """Raise :class:`NotADigitModelError` saying why the model cannot be asked about a digit.

    Models fedcoreml cannot run at all raise the interpreter's own error (an ML Program, a layer
    it does not implement).
    """
    network = parse_network(spec, model_name)
    if network.input_declared_shape not in _DIGIT_INPUT_SHAPES:
        raise NotADigitModelError(
            f"{model_name}: input '{network.input_name}' has shape "
            f"{list(network.input_declared_shape)}; predict takes a 28x28 grey image "
            "([1, 28, 28], or [784] flattened)"
        )
    if len(network.outputs) != 1:
        raise NotADigitModelError(
            f"{model_name}: has {len(network.outputs)} outputs ({', '.join(network.outputs)}); "
            "predict needs one output of class probabilities"
        )
    name, shape = next(iter(network.outputs.items()))
    if int(np.prod(shape)) < 2 or sum(1 for d in shape if d > 1) != 1:
        raise NotADigitModelError(
            f"{model_name}: output '{name}' has shape {list(shape)}; predict needs a vector of "
            "class probabilities"
        )


class Predictor:
    """One model, ready to predict: parsed and checked once, then :meth:`predict` per image."""

    def __init__(self, model: ModelSource, model_name: str | None = None) -> None:
        self.spec, self.model_name = _spec_of(model, model_name)
        check_digit_model(self.spec, self.model_name)
        self._interpreter = ReferenceInterpreter(self.spec, self.model_name)
        network = self._interpreter.network
        self._input_shape = network.input_declared_shape
        self._output, shape = next(iter(network.outputs.items()))
        self.class_labels: tuple[str, ...] = tuple(str(i) for i in range(int(np.prod(shape))))

    def predict(self, image: ImageSource) -> Prediction:
        """The model's prediction for one image (see the module docstring for the conversion)."""
        seen = load_image(image)
        batch = seen.reshape(1, *self._input_shape)
        probabilities = self._interpreter.predict(batch, [self._output])[self._output].reshape(-1)
        best = int(np.argmax(probabilities))
        return Prediction(
            label=self.class_labels[best],
            probabilities={
                label: float(p) for label, p in zip(self.class_labels, probabilities, strict=True)
            },
            image=seen,
        )


def predict(model: ModelSource, image: ImageSource) -> Prediction:
    """The prediction of ``model`` (.mlmodel bytes, a path, or a spec) for ``image``."""
    return Predictor(model).predict(image)


def load_image(image: ImageSource) -> np.ndarray:
    """``image`` as the model sees it: float32 [28, 28] in 0..1, white on black.

    ``image``: a ``.png`` or ``.npy`` file, PNG bytes, or an array ([H, W], [1, H, W],
    [H, W, 3|4] colour, or a flat [784]). Transparent pixels (RGBA: a PNG's, or a web canvas's
    ``getImageData``) count as white paper.
    """
    if isinstance(image, np.ndarray):
        return prepare_image(image)
    if isinstance(image, bytes | bytearray):
        return prepare_image(_decode_png(bytes(image), "image bytes"))
    path = Path(image)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ImageInputError(f"{path}: not a .npy array file ({exc})") from None
        return prepare_image(array, str(path))
    if suffix == ".png":
        return prepare_image(_decode_png(path.read_bytes(), str(path)), str(path))
    raise ImageInputError(f"{path}: expected a .png or .npy file")


def prepare_image(array: np.ndarray, where: str = "image") -> np.ndarray:
    """An image array made into the model's input (see the module docstring)."""
    grey = _grey(np.asarray(array), where)
    if float(_border(grey).mean()) > 0.5:
        grey = 1.0 - grey
    if grey.shape != (IMAGE_SIDE, IMAGE_SIDE):
        grey = _fit_like_mnist(grey)
    return np.ascontiguousarray(grey, dtype=np.float32)


def _spec_of(model: ModelSource, model_name: str | None) -> tuple[Model_pb2.Model, str]:
    if isinstance(model, Model_pb2.Model):
        return model, model_name or "model"
    if isinstance(model, bytes | bytearray):
        return spec_from_bytes(bytes(model)), model_name or "model bytes"
    return load_spec(model), model_name or str(model)


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ImageInputError(f"{where}: a {img.format} image; expected a PNG")
            if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
                # A transparent background is the page the digit was drawn on: white.
                rgba = img.convert("RGBA")
                page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(page, rgba)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageInputError(f"{where}: not a readable PNG image ({exc})") from None


def _grey(array: np.ndarray, where: str) -> np.ndarray:
    """Any supported array layout and dtype as float [H, W] in 0..1."""
    if array.ndim == 1 and array.size == IMAGE_SIDE * IMAGE_SIDE:
        array = array.reshape(IMAGE_SIDE, IMAGE_SIDE)
    elif array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 4 and array.shape[:2] == (1, 1):
        array = array[0, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = _over_white_page(array)
    if array.ndim == 3 and array.shape[2] == 3:
        array = _luminance(array)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageInputError(
            f"{where}: an array of shape {list(array.shape)}; expected a grey image [H, W] "
            "([1, H, W] and [784] too) or a colour one [H, W, 3|4]"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float64) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or float(array.min()) < 0.0 or float(array.max()) > 1.0:
            raise ImageInputError(
                f"{where}: float pixels must lie in 0..1 (as the training data), got "
                f"{float(np.nanmin(array)):g}..{float(np.nanmax(array)):g}"
            )
        return array.astype(np.float64)
    raise ImageInputError(
        f"{where}: pixels of dtype {array.dtype}; expected uint8 (0..255), uint16 or float 0..1"
    )


def _over_white_page(rgba: np.ndarray) -> np.ndarray:
    """RGBA to RGB over white, as a PNG's transparency is read (a canvas's clear pixels too)."""
    if rgba.dtype == np.uint8:
        alpha = rgba[..., 3:].astype(np.float64) / 255.0
        rgb = rgba[..., :3].astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
        return np.round(rgb).astype(np.uint8)
    if np.issubdtype(rgba.dtype, np.floating):
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return rgba[..., :3]  # its dtype is refused below, with the reason


def _luminance(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    grey = rgb.astype(np.float64) @ weights
    return np.round(grey).astype(rgb.dtype) if rgb.dtype.kind == "u" else grey


def _border(grey: np.ndarray) -> np.ndarray:
    return np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])


def _fit_like_mnist(grey: np.ndarray) -> np.ndarray:
    """Scale the ink's bounding box to fit 20x20, then centre its mass in 28x28."""
    from PIL import Image

    rows = np.flatnonzero((grey > _INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((grey > _INK_THRESHOLD).any(axis=0))
    if rows.size == 0:  # nothing drawn: a blank input
        return np.zeros((IMAGE_SIDE, IMAGE_SIDE))
    box = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = _DIGIT_BOX / max(box.shape)
    height = max(1, round(box.shape[0] * scale))
    width = max(1, round(box.shape[1] * scale))
    resized = Image.fromarray(box.astype(np.float32)).resize(
        (width, height), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    )
    digit = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    frame = np.zeros((IMAGE_SIDE, IMAGE_SIDE))
    top, left = (IMAGE_SIDE - height) // 2, (IMAGE_SIDE - width) // 2
    frame[top : top + height, left : left + width] = digit
    return _centre_mass(frame)


def _centre_mass(frame: np.ndarray) -> np.ndarray:
    """Shift by whole pixels so the centre of mass lies at the frame's centre, ink kept inside."""
    total = frame.sum()
    ys, xs = np.indices(frame.shape)
    centre = (IMAGE_SIDE - 1) / 2
    dy = round(centre - float((ys * frame).sum() / total))
    dx = round(centre - float((xs * frame).sum() / total))
    rows = np.flatnonzero(frame.any(axis=1))
    cols = np.flatnonzero(frame.any(axis=0))
    dy = int(np.clip(dy, -rows[0], IMAGE_SIDE - 1 - rows[-1]))
    dx = int(np.clip(dx, -cols[0], IMAGE_SIDE - 1 - cols[-1]))
    return np.roll(frame, (dy, dx), axis=(0, 1))
