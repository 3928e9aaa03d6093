"""Every updatable parameter of a spec as an ordered, named list of float32 arrays (Core ML layout).

Names are ``<layer>.weights`` and ``<layer>.bias``, in layer order. Layouts are Core ML's own:
convolution weights [outC, kC, kH, kW], inner-product weights [out, in], biases [out]. This is
what devices send and what the coordinator averages.

Writing is on the coordinator's per-round path, so values move between numpy and the protobuf as
packed bytes (one memcpy) rather than element by element, which is ~100x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2, NeuralNetwork_pb2
from fedcoreml.ios_bridge.errors import FedCoreMLError, ParameterError
from fedcoreml.ios_bridge.network import Convolution, InnerProduct, parse_network

_FLOAT_VALUE_TAG = b"\x0a"  # WeightParams.floatValue: field 1, length-delimited (packed)


@dataclass(frozen=True)
class ParameterInfo:
    name: str  # "<layer>.weights" or "<layer>.bias"
    layer: str
    field: str  # "weights" or "bias"
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def parameter_infos(
    spec: Model_pb2.Model, model_name: str = "model", include_frozen: bool = False
) -> list[ParameterInfo]:
    """Names and Core ML shapes of the updatable parameters (or of all, if include_frozen)."""
    network = parse_network(spec, model_name)
    layers = (
        [layer for layer in network.layers if isinstance(layer, Convolution | InnerProduct)]
        if include_frozen
        else network.trainable_layers
    )
    infos: list[ParameterInfo] = []
    for layer in layers:
        if isinstance(layer, Convolution):
            shape: tuple[int, ...] = (layer.out_channels, layer.in_channels, *layer.kernel)
            outputs = layer.out_channels
        else:
            assert isinstance(layer, InnerProduct)
            shape = (layer.out_features, layer.in_features)
            outputs = layer.out_features
        infos.append(ParameterInfo(f"{layer.name}.weights", layer.name, "weights", shape))
        if layer.has_bias:
            infos.append(ParameterInfo(f"{layer.name}.bias", layer.name, "bias", (outputs,)))
    return infos


def _weight_params(spec: Model_pb2.Model, info: ParameterInfo) -> NeuralNetwork_pb2.WeightParams:
    nn = spec.neuralNetwork if spec.HasField("neuralNetwork") else spec.neuralNetworkClassifier
    for raw in nn.layers:
        if raw.name == info.layer:
            typed = getattr(raw, raw.WhichOneof("layer"))
            return getattr(typed, info.field)
    raise KeyError(info.layer)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_floats(weights: NeuralNetwork_pb2.WeightParams, count: int) -> np.ndarray:
    # Serialize just this message; field 1 (floatValue) comes first in the encoding as one packed
    # run of little-endian float32 values, so it can be viewed without a per-element copy.
    data = weights.SerializeToString()
    if count == 0:
        return np.zeros(0, dtype=np.float32)
    if data[:1] == _FLOAT_VALUE_TAG:
        pos, length, shift = 1, 0, 0
        while True:
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if not byte & 0x80:
                break
        if length == 4 * count:
            return np.frombuffer(data, dtype="<f4", count=count, offset=pos).astype(np.float32)
    return np.asarray(weights.floatValue, dtype=np.float32)


def get_parameters(
    spec: Model_pb2.Model, model_name: str = "model", include_frozen: bool = False
) -> list[tuple[str, np.ndarray]]:
    """The updatable parameters as (name, float32 array in Core ML layout), in order.

    With ``include_frozen``, the weights of non-updatable layers are included too.
    """
    return [
        (info.name, _read_floats(_weight_params(spec, info), info.size).reshape(info.shape))
        for info in parameter_infos(spec, model_name, include_frozen)
    ]


def check_parameters(
    infos: list[ParameterInfo], parameters: list[tuple[str, np.ndarray]] | dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Validate parameters against ``infos``; return the arrays in order. Raises ParameterError."""
    given = dict(parameters) if not isinstance(parameters, dict) else parameters
    if isinstance(parameters, list) and len(given) != len(parameters):
        names = [name for name, _ in parameters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ParameterError(f"duplicate parameter names: {', '.join(dupes)}")
    expected = {info.name for info in infos}
    unknown = sorted(set(given) - expected)
    missing = [info.name for info in infos if info.name not in given]
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(unknown)}; the model's updatable parameters are "
            f"{', '.join(info.name for info in infos)}"
        )
    if missing:
        raise ParameterError(f"missing parameter(s): {', '.join(missing)}")
    arrays: list[np.ndarray] = []
    for info in infos:
        value = given[info.name]
        if not isinstance(value, np.ndarray):
            raise ParameterError(
                f"layer '{info.layer}' {info.field}: expected a numpy float32 array, "
                f"got {type(value).__name__}"
            )
        if value.dtype != np.float32:
            raise ParameterError(
                f"layer '{info.layer}' {info.field}: expected dtype float32, got {value.dtype}"
            )
        if tuple(value.shape) != info.shape:
            raise ParameterError(
                f"layer '{info.layer}' {info.field}: expected shape {list(info.shape)}, "
                f"got {list(value.shape)}"
            )
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ParameterError(
                f"layer '{info.layer}' {info.field}: {bad} non-finite value(s) (NaN or Inf)"
            )
        arrays.append(value)
    return arrays


def set_parameters(
    spec: Model_pb2.Model,
    parameters: list[tuple[str, np.ndarray]] | dict[str, np.ndarray],
    model_name: str = "model",
    infos: list[ParameterInfo] | None = None,
) -> None:
    """Write every updatable parameter into ``spec`` in place.

    All parameters are checked before any is written, so on error the spec is unchanged.
    ``infos`` (from :func:`parameter_infos`) may be passed to skip re-parsing the network.
    """
    infos = parameter_infos(spec, model_name) if infos is None else infos
    arrays = check_parameters(infos, parameters)
    for info, value in zip(infos, arrays, strict=True):
        _write_floats(_weight_params(spec, info), value)


def _write_floats(weights: NeuralNetwork_pb2.WeightParams, value: np.ndarray) -> None:
    """Replace ``weights.floatValue`` with ``value``, as one packed run of bytes."""
    payload = np.ascontiguousarray(value, dtype="<f4").tobytes()
    weights.ClearField("floatValue")
    weights.MergeFromString(_FLOAT_VALUE_TAG + _varint(len(payload)) + payload)


def strip_parameters(spec: Model_pb2.Model, model_name: str = "model") -> Model_pb2.Model:
    """A copy of ``spec`` whose updatable parameters hold no values: the bare architecture.

    Together with the parameters (see :func:`fill_parameters`) it makes the full model again;
    it is a few kilobytes where the model is megabytes.
    """
    bare = Model_pb2.Model()
    bare.CopyFrom(spec)
    for info in parameter_infos(spec, model_name):
        _weight_params(bare, info).ClearField("floatValue")
    return bare


def fill_parameters(
    bare: Model_pb2.Model, parameters: list[tuple[str, np.ndarray]], model_name: str = "model"
) -> Model_pb2.Model:
    """The full model from :func:`strip_parameters`' architecture and named parameters.

    Each ``"<layer>.weights"`` / ``"<layer>.bias"`` is written into its layer, then the result
    is checked as any model is: every updatable parameter present with its layer's shape.
    """
    spec = Model_pb2.Model()
    spec.CopyFrom(bare)
    parameters = [
        (name, value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value)
        for name, value in ((n, np.asarray(v)) for n, v in parameters)
    ]  # aggregation may hand back float64; Core ML stores float32
    for name, value in parameters:
        layer, _, field = name.rpartition(".")
        if field not in ("weights", "bias") or not layer:
            raise ParameterError(f"parameter {name!r}: expected '<layer>.weights' or '.bias'")
        info = ParameterInfo(name, layer, field, tuple(np.shape(value)))
        try:
            weights = _weight_params(spec, info)
        except KeyError:
            raise ParameterError(
                f"parameter {name!r}: {model_name} has no layer {layer!r}"
            ) from None
        _write_floats(weights, value)
    try:
        infos = parameter_infos(spec, model_name)
    except FedCoreMLError as exc:  # a layer left without values
        raise ParameterError(f"the parameters do not complete the model: {exc}") from None
    check_parameters(infos, parameters)
    return spec


def count_parameters(spec: Model_pb2.Model, model_name: str = "model") -> int:
    """Total number of updatable parameter values."""
    return sum(info.size for info in parameter_infos(spec, model_name))
