"""A checked, typed view of a Core ML NeuralNetwork spec: the layers fedcoreml can run and train.

``parse_network`` turns a spec into a list of small layer records with their input and output
shapes, rejecting anything outside scope with an :class:`UnsupportedModelError` that names the
model and the layer. The reference interpreter and the TensorFlow training emulator both work
from this one description, so they cannot disagree about what a spec means.

Shapes follow Core ML: a blob is (C, H, W) per example; a flat vector of F values is (F, 1, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2, NeuralNetwork_pb2
from fedcoreml.ios_bridge.errors import ParameterError, UnsupportedModelError

Shape = tuple[int, int, int]
PaddingMode = Literal["valid", "same"]
Pads = tuple[int, int, int, int]  # top, bottom, left, right

SUPPORTED_LAYER_TYPES = (
    "convolution",
    "pooling",
    "activation",
    "flatten",
    "innerProduct",
    "softmax",
)
SUPPORTED_ACTIVATIONS = {"ReLU": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


@dataclass(frozen=True)
class Layer:
    name: str
    input: str
    output: str
    input_shape: Shape
    output_shape: Shape


@dataclass(frozen=True)
class Convolution(Layer):
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: PaddingMode
    pads: Pads  # the zero padding actually applied, for either mode
    has_bias: bool
    updatable: bool


@dataclass(frozen=True)
class Pooling(Layer):
    kind: Literal["max", "average"]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: PaddingMode
    pads: Pads
    exclude_padding: bool  # average pooling: divide by the count of real (unpadded) values


@dataclass(frozen=True)
class Activation(Layer):
    function: Literal["relu", "sigmoid", "tanh"]


@dataclass(frozen=True)
class Flatten(Layer):
    order: Literal["channel_first", "channel_last"]


@dataclass(frozen=True)
class InnerProduct(Layer):
    in_features: int
    out_features: int
    has_bias: bool
    updatable: bool


@dataclass(frozen=True)
class Softmax(Layer):
    pass


@dataclass(frozen=True)
class Network:
    """The forward part of a spec: one multi-array input, the layers in order, the outputs."""

    model_name: str
    input_name: str
    input_declared_shape: tuple[int, ...]
    input_shape: Shape
    layers: tuple[Layer, ...]
    outputs: dict[str, tuple[int, ...]]  # output name -> declared shape per example

    @property
    def trainable_layers(self) -> tuple[Convolution | InnerProduct, ...]:
        return tuple(
            layer
            for layer in self.layers
            if isinstance(layer, Convolution | InnerProduct) and layer.updatable
        )

    def input_batch(self, inputs) -> np.ndarray:
        """A batch of examples (N x declared input shape) as float32 N x C x H x W."""
        x = np.asarray(inputs, dtype=np.float32)
        if x.shape[1:] != self.input_declared_shape:
            raise ParameterError(
                f"{self.model_name}: input '{self.input_name}' expects examples of shape "
                f"{list(self.input_declared_shape)}, got a batch of shape {list(x.shape)}"
            )
        return x.reshape(x.shape[0], *self.input_shape)

    def example_shape(self, name: str) -> tuple[int, ...]:
        """Per-example shape a caller sees for a blob: its declared shape for a model output,
        (F,) for a flat vector, else (C, H, W). Raises KeyError for an unknown blob."""
        if name in self.outputs:
            return self.outputs[name]
        return _squeeze(self.blob_shape(name))

    def blob_shape(self, name: str) -> Shape:
        if name == self.input_name:
            return self.input_shape
        for layer in self.layers:
            if layer.output == name:
                return layer.output_shape
        raise KeyError(name)


def neural_network_of(spec: Model_pb2.Model, model_name: str) -> NeuralNetwork_pb2.NeuralNetwork:
    """The NeuralNetwork message of a spec, or an error saying what kind of model it is."""
    kind = spec.WhichOneof("Type")
    if kind == "neuralNetwork":
        return spec.neuralNetwork
    if kind == "neuralNetworkClassifier":
        return spec.neuralNetworkClassifier
    if kind == "mlProgram":
        raise UnsupportedModelError(
            f"{model_name}: is an ML Program; fedcoreml trains NeuralNetwork models "
            "(Core ML's on-device update task only supports NeuralNetwork specs)"
        )
    raise UnsupportedModelError(
        f"{model_name}: is a '{kind}' model, not a NeuralNetwork; fedcoreml cannot train it"
    )


def _multiarray_shape(feature: Model_pb2.FeatureDescription, model_name: str) -> tuple[int, ...]:
    kind = feature.type.WhichOneof("Type")
    if kind != "multiArrayType":
        raise UnsupportedModelError(
            f"{model_name}: feature '{feature.name}' is of type {kind}; fedcoreml supports "
            "multi-array inputs and outputs only"
        )
    return tuple(int(d) for d in feature.type.multiArrayType.shape)


def _input_blob_shape(declared: tuple[int, ...], model_name: str, name: str) -> Shape:
    if len(declared) == 3:
        return (declared[0], declared[1], declared[2])
    if len(declared) == 1:
        return (declared[0], 1, 1)
    raise UnsupportedModelError(
        f"{model_name}: input '{name}' has shape {list(declared)}; expected [C, H, W] or [C]"
    )


def _pads_for(
    mode: PaddingMode,
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    explicit: Pads = (0, 0, 0, 0),
) -> Pads:
    if mode == "valid":
        return explicit
    # Core ML "same" with BOTTOM_RIGHT_HEAVY asymmetry: the same rule as TensorFlow's.
    pads: list[int] = []
    for size, k, s in zip(in_hw, kernel, stride, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return (pads[0], pads[1], pads[2], pads[3])


def _spatial_out(
    in_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], pads: Pads
) -> tuple[int, int]:
    h = (in_hw[0] + pads[0] + pads[1] - kernel[0]) // stride[0] + 1
    w = (in_hw[1] + pads[2] + pads[3] - kernel[1]) // stride[1] + 1
    return h, w


def _padding_of(params, oneof: str, layer_name: str, model_name: str) -> tuple[PaddingMode, Pads]:
    mode = params.WhichOneof(oneof)
    if mode == "same":
        if params.same.asymmetryMode != 0:  # TOP_LEFT_HEAVY
            raise UnsupportedModelError(
                f"{model_name}: layer '{layer_name}': 'same' padding with TOP_LEFT_HEAVY asymmetry "
                "is not supported (BOTTOM_RIGHT_HEAVY only)"
            )
        return "same", (0, 0, 0, 0)
    if mode in (None, "valid"):
        amounts = list(params.valid.paddingAmounts.borderAmounts) if mode else []
        if not amounts:
            return "valid", (0, 0, 0, 0)
        if len(amounts) != 2:
            raise UnsupportedModelError(
                f"{model_name}: layer '{layer_name}': expected 2 padding amounts (H, W), "
                f"got {len(amounts)}"
            )
        return "valid", (
            int(amounts[0].startEdgeSize),
            int(amounts[0].endEdgeSize),
            int(amounts[1].startEdgeSize),
            int(amounts[1].endEdgeSize),
        )
    raise UnsupportedModelError(
        f"{model_name}: layer '{layer_name}': padding type '{mode}' is not supported "
        "(valid or same only)"
    )


def _pair(values, default: int, what: str, layer_name: str, model_name: str) -> tuple[int, int]:
    values = list(values) or [default, default]
    if len(values) != 2:
        raise UnsupportedModelError(
            f"{model_name}: layer '{layer_name}': {what} must have 2 values, got {values}"
        )
    return int(values[0]), int(values[1])


def _weight_count(weights: NeuralNetwork_pb2.WeightParams) -> int:
    """Number of float32 values a WeightParams holds (after checking it is float32)."""
    return len(weights.floatValue)


def _check_float32_weights(
    weights: NeuralNetwork_pb2.WeightParams, expected: int, what: str, layer: str, model: str
) -> None:
    if len(weights.float16Value) or len(weights.rawValue) or len(weights.int8RawValue):
        raise UnsupportedModelError(
            f"{model}: layer '{layer}': {what} are stored as float16/raw/quantized values; "
            "updatable Core ML layers need float32 weights"
        )
    if _weight_count(weights) != expected:
        raise UnsupportedModelError(
            f"{model}: layer '{layer}': {what} hold {_weight_count(weights)} values, "
            f"expected {expected}"
        )


@dataclass(frozen=True)
class _Window:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: PaddingMode
    explicit: Pads
    pads: Pads
    out_hw: tuple[int, int]


def _sliding_window(p, oneof: str, input_shape: Shape, name: str, model: str) -> _Window:
    """Kernel, stride and padding of a convolution or pooling layer, and its output size."""
    kernel = _pair(p.kernelSize, 3, "kernelSize", name, model)
    stride = _pair(p.stride, 1, "stride", name, model)
    mode, explicit = _padding_of(p, oneof, name, model)
    in_hw = (input_shape[1], input_shape[2])
    pads = _pads_for(mode, in_hw, kernel, stride, explicit)
    out_hw = _spatial_out(in_hw, kernel, stride, pads)
    if out_hw[0] < 1 or out_hw[1] < 1:
        raise UnsupportedModelError(
            f"{model}: layer '{name}': a {kernel} window does not fit input {list(input_shape)}"
        )
    return _Window(kernel, stride, mode, explicit, pads, out_hw)


def _parse_convolution(raw, input_shape: Shape, model: str) -> Convolution:
    p = raw.convolution
    name = raw.name
    if p.isDeconvolution:
        raise UnsupportedModelError(f"{model}: layer '{name}': deconvolution is not supported")
    if p.nGroups not in (0, 1):
        raise UnsupportedModelError(
            f"{model}: layer '{name}': grouped convolution (nGroups={p.nGroups}) is not supported"
        )
    if any(d not in (0, 1) for d in p.dilationFactor):
        raise UnsupportedModelError(
            f"{model}: layer '{name}': dilated convolution {list(p.dilationFactor)} "
            "is not supported"
        )
    in_c = input_shape[0]
    if p.kernelChannels != in_c:
        raise UnsupportedModelError(
            f"{model}: layer '{name}': kernelChannels={p.kernelChannels} but its input "
            f"'{raw.input[0]}' has {in_c} channels"
        )
    window = _sliding_window(p, "ConvolutionPaddingType", input_shape, name, model)
    kh, kw = window.kernel
    out_c = int(p.outputChannels)
    _check_float32_weights(p.weights, out_c * in_c * kh * kw, "weights", name, model)
    if p.hasBias:
        _check_float32_weights(p.bias, out_c, "bias", name, model)
    return Convolution(
        name=name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=(out_c, *window.out_hw),
        in_channels=in_c,
        out_channels=out_c,
        kernel=window.kernel,
        stride=window.stride,
        padding=window.padding,
        pads=window.pads,
        has_bias=bool(p.hasBias),
        updatable=bool(raw.isUpdatable),
    )


def _parse_pooling(raw, input_shape: Shape, model: str) -> Pooling:
    p = raw.pooling
    name = raw.name
    kinds = {0: "max", 1: "average"}
    if p.type not in kinds:
        raise UnsupportedModelError(
            f"{model}: layer '{name}': L2 pooling is not supported (max or average only)"
        )
    if p.globalPooling:
        raise UnsupportedModelError(f"{model}: layer '{name}': global pooling is not supported")
    if p.WhichOneof("PoolingPaddingType") == "includeLastPixel":
        raise UnsupportedModelError(
            f"{model}: layer '{name}': 'includeLastPixel' pooling padding is not supported "
            "(valid or same only)"
        )
    window = _sliding_window(p, "PoolingPaddingType", input_shape, name, model)
    if window.explicit != (0, 0, 0, 0):
        raise UnsupportedModelError(
            f"{model}: layer '{name}': explicit pooling padding {list(window.explicit)} "
            "is not supported"
        )
    return Pooling(
        name=name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=(input_shape[0], *window.out_hw),
        kind=kinds[p.type],  # type: ignore[arg-type]
        kernel=window.kernel,
        stride=window.stride,
        padding=window.padding,
        pads=window.pads,
        exclude_padding=bool(p.avgPoolExcludePadding),
    )


def _parse_activation(raw, input_shape: Shape, model: str) -> Activation:
    kind = raw.activation.WhichOneof("NonlinearityType")
    if kind not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{model}: layer '{raw.name}': activation '{kind}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return Activation(
        name=raw.name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=input_shape,
        function=SUPPORTED_ACTIVATIONS[kind],  # type: ignore[arg-type]
    )


def _parse_flatten(raw, input_shape: Shape, model: str) -> Flatten:
    order = "channel_first" if raw.flatten.mode == 0 else "channel_last"
    c, h, w = input_shape
    return Flatten(
        name=raw.name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=(c * h * w, 1, 1),
        order=order,  # type: ignore[arg-type]
    )


def _parse_inner_product(raw, input_shape: Shape, model: str) -> InnerProduct:
    p = raw.innerProduct
    name = raw.name
    c, h, w = input_shape
    if (h, w) != (1, 1):
        raise UnsupportedModelError(
            f"{model}: layer '{name}': inner product input '{raw.input[0]}' has shape "
            f"{list(input_shape)}; add a flatten layer before it"
        )
    if p.inputChannels != c:
        raise UnsupportedModelError(
            f"{model}: layer '{name}': inputChannels={p.inputChannels} but its input has {c} values"
        )
    if p.int8DynamicQuantize:
        raise UnsupportedModelError(f"{model}: layer '{name}': int8 dynamic quantization")
    out = int(p.outputChannels)
    _check_float32_weights(p.weights, out * c, "weights", name, model)
    if p.hasBias:
        _check_float32_weights(p.bias, out, "bias", name, model)
    return InnerProduct(
        name=name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=(out, 1, 1),
        in_features=c,
        out_features=out,
        has_bias=bool(p.hasBias),
        updatable=bool(raw.isUpdatable),
    )


def _parse_softmax(raw, input_shape: Shape, model: str) -> Softmax:
    return Softmax(
        name=raw.name,
        input=raw.input[0],
        output=raw.output[0],
        input_shape=input_shape,
        output_shape=input_shape,
    )


_PARSERS = {
    "convolution": _parse_convolution,
    "pooling": _parse_pooling,
    "activation": _parse_activation,
    "flatten": _parse_flatten,
    "innerProduct": _parse_inner_product,
    "softmax": _parse_softmax,
}


def parse_network(spec: Model_pb2.Model, model_name: str = "model") -> Network:
    """Check that a spec is a NeuralNetwork fedcoreml can run, and describe it layer by layer."""
    nn = neural_network_of(spec, model_name)
    inputs = list(spec.description.input)
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"{model_name}: has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "fedcoreml supports models with exactly one multi-array input"
        )
    if len(nn.preprocessing):
        raise UnsupportedModelError(f"{model_name}: image preprocessing is not supported")
    input_name = inputs[0].name
    declared = _multiarray_shape(inputs[0], model_name)
    input_shape = _input_blob_shape(declared, model_name, input_name)
    shapes: dict[str, Shape] = {input_name: input_shape}
    layers: list[Layer] = []
    for raw in nn.layers:
        kind = raw.WhichOneof("layer")
        if kind not in _PARSERS:
            raise UnsupportedModelError(
                f"{model_name}: layer '{raw.name}' is of type '{kind}', which fedcoreml's "
                f"emulator does not implement (supported: {', '.join(SUPPORTED_LAYER_TYPES)})"
            )
        if len(raw.input) != 1 or len(raw.output) != 1:
            raise UnsupportedModelError(
                f"{model_name}: layer '{raw.name}' has {len(raw.input)} inputs and "
                f"{len(raw.output)} outputs; expected one of each"
            )
        if raw.input[0] not in shapes:
            raise UnsupportedModelError(
                f"{model_name}: layer '{raw.name}' reads '{raw.input[0]}', which no earlier "
                "layer or model input produces"
            )
        if raw.isUpdatable and kind not in ("convolution", "innerProduct"):
            raise UnsupportedModelError(
                f"{model_name}: layer '{raw.name}' ({kind}) is marked updatable; only "
                "convolution and innerProduct layers can be"
            )
        layer = _PARSERS[kind](raw, shapes[raw.input[0]], model_name)
        shapes[layer.output] = layer.output_shape
        layers.append(layer)
    outputs: dict[str, tuple[int, ...]] = {}
    for feature in spec.description.output:
        if feature.name not in shapes:
            raise UnsupportedModelError(
                f"{model_name}: output '{feature.name}' is not produced by any layer"
            )
        declared_out = _multiarray_shape(feature, model_name)
        blob = shapes[feature.name]
        if declared_out and _size(declared_out) != _size(blob):
            raise UnsupportedModelError(
                f"{model_name}: output '{feature.name}' is declared {list(declared_out)} but the "
                f"network produces {list(blob)}"
            )
        outputs[feature.name] = declared_out or _squeeze(blob)
    return Network(
        model_name=model_name,
        input_name=input_name,
        input_declared_shape=declared,
        input_shape=input_shape,
        layers=tuple(layers),
        outputs=outputs,
    )


def _size(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _squeeze(shape: Shape) -> tuple[int, ...]:
    return (shape[0],) if shape[1:] == (1, 1) else shape
