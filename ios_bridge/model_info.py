"""Describe any .mlmodel: features, layers, loss, optimizer, and whether fedcoreml can train it.

``describe`` never raises for a readable spec: a model outside fedcoreml's scope is still listed
as far as the generic spec allows, with ``trainable`` false and a ``problem`` that names the model
and the layer.
"""

from __future__ import annotations

from typing import Any

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2, NeuralNetwork_pb2
from fedcoreml.ios_bridge.errors import UnsupportedModelError
from fedcoreml.ios_bridge.network import Network, neural_network_of, parse_network
from fedcoreml.ios_bridge.update_params import DoubleRange, IntChoice, parse_update_params

_ARRAY_TYPES = {
    Model_pb2.ArrayFeatureType.FLOAT32: "float32",
    Model_pb2.ArrayFeatureType.DOUBLE: "float64",
    Model_pb2.ArrayFeatureType.INT32: "int32",
    Model_pb2.ArrayFeatureType.FLOAT16: "float16",
}


def _feature(feature: Model_pb2.FeatureDescription) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    info: dict[str, Any] = {"name": feature.name, "type": kind}
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        info["type"] = "multiArray"
        info["dtype"] = _ARRAY_TYPES.get(array.dataType, str(array.dataType))
        info["shape"] = [int(d) for d in array.shape]
    elif kind == "imageType":
        info["shape"] = [int(feature.type.imageType.height), int(feature.type.imageType.width)]
    if feature.shortDescription:
        info["description"] = feature.shortDescription
    return info


def _generic_parameter_count(raw: NeuralNetwork_pb2.NeuralNetworkLayer) -> int:
    """Count values in every WeightParams field of a layer, whatever its type."""
    typed = getattr(raw, raw.WhichOneof("layer"))
    total = 0
    for descriptor, value in typed.ListFields():
        if descriptor.message_type is NeuralNetwork_pb2.WeightParams.DESCRIPTOR:
            total += (
                len(value.floatValue)
                + len(value.float16Value) // 2
                + len(value.rawValue) // 4
                + len(value.int8RawValue)
            )
    return total


def _range(value: DoubleRange) -> dict[str, float]:
    return {"default": value.default, "min": value.minimum, "max": value.maximum}


def _choice(value: IntChoice) -> dict[str, Any]:
    if value.allowed_set is not None:
        return {"default": value.default, "allowed": list(value.allowed_set)}
    return {"default": value.default, "min": value.minimum, "max": value.maximum}


def describe(spec: Model_pb2.Model, model_name: str = "model") -> dict[str, Any]:
    """A JSON-ready description of a spec (see the module docstring)."""
    info: dict[str, Any] = {
        "model": model_name,
        "specification_version": int(spec.specificationVersion),
        "model_type": spec.WhichOneof("Type"),
        "updatable": bool(spec.isUpdatable),
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "training_inputs": [_feature(f) for f in spec.description.trainingInput],
        "layers": [],
        "total_parameters": 0,
        "trainable_parameters": 0,
        "trainable": False,
        "problem": None,
    }
    try:
        nn = neural_network_of(spec, model_name)
    except UnsupportedModelError as exc:
        info["problem"] = str(exc)
        return info

    network: Network | None = None
    try:
        network = parse_network(spec, model_name)
    except UnsupportedModelError as exc:
        info["problem"] = str(exc)
    shapes = {layer.name: layer for layer in network.layers} if network else {}
    for raw in nn.layers:
        count = _generic_parameter_count(raw)
        entry: dict[str, Any] = {
            "name": raw.name,
            "type": raw.WhichOneof("layer"),
            "inputs": list(raw.input),
            "outputs": list(raw.output),
            "parameters": count,
            "updatable": bool(raw.isUpdatable),
        }
        if raw.name in shapes:
            entry["input_shape"] = list(shapes[raw.name].input_shape)
            entry["output_shape"] = list(shapes[raw.name].output_shape)
        info["layers"].append(entry)
        info["total_parameters"] += count
        if raw.isUpdatable:
            info["trainable_parameters"] += count

    if network is None:
        return info
    try:
        update = parse_update_params(spec, network)
    except UnsupportedModelError as exc:
        info["problem"] = str(exc)
        return info
    info["loss"] = {
        "type": update.loss.kind,
        "name": update.loss.name,
        "input": update.loss.input,
        "target": update.loss.target,
    }
    info["optimizer"] = {
        "type": update.optimizer.kind,
        "learning_rate": _range(update.optimizer.learning_rate),
        "batch_size": _choice(update.optimizer.batch_size),
        **{name: _range(value) for name, value in update.optimizer.hyper.items()},
    }
    info["epochs"] = _choice(update.epochs)
    info["shuffle"] = update.shuffle
    info["seed"] = update.seed
    info["trainable"] = True
    return info


def require_trainable(spec: Model_pb2.Model, model_name: str = "model") -> None:
    """Raise UnsupportedModelError (naming model and layer) unless fedcoreml can train the spec."""
    parse_update_params(spec, parse_network(spec, model_name))
