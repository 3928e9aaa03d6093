"""Core ML training emulator: trains an updatable .mlmodel the way ``MLUpdateTask`` would.

From any NeuralNetwork spec in scope it builds an equivalent Keras model, loads the spec's
parameters, and trains with the spec's own loss, optimizer and defaults; per-call overrides of
epochs, batch size and learning rate must lie in the spec's allowed values, as on a phone.
The updated parameters come back in Core ML layout, ready to send or to write into the spec.

Keras computes in channels-last (N, H, W, C); Core ML in channels-first (C, H, W). The layout is
translated at the edges only: inputs once per call, kernels when loading or reading parameters
([outC, kC, kH, kW] <-> [kH, kW, kC, outC]; [out, in] <-> [in, out]), and a CHANNEL_FIRST
flatten becomes a permute to (C, H, W) before flattening.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedcoreml.client_sim.tensorflow_quiet import keras, tf
from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import ParameterError, UnsupportedModelError
from fedcoreml.ios_bridge.metrics import classification_metrics
from fedcoreml.ios_bridge.network import (
    Activation,
    Convolution,
    Flatten,
    InnerProduct,
    Network,
    Pooling,
    Softmax,
    parse_network,
)
from fedcoreml.ios_bridge.parameters import (
    check_parameters,
    get_parameters,
    parameter_infos,
    set_parameters,
)
from fedcoreml.ios_bridge.update_params import TrainingConfig, UpdateParams, parse_update_params

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What one update task produces, as a device would report it."""

    parameters: list[tuple[str, np.ndarray]]  # every updatable parameter, Core ML layout
    num_examples: int
    loss: float  # mean training loss of the last epoch
    accuracy: float  # training accuracy of the last epoch
    config: TrainingConfig
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch


class _Tensor:
    """A Keras tensor plus whether it is spatial (N, H, W, C) or flat (N, F)."""

    def __init__(self, value, spatial: bool) -> None:
        self.value = value
        self.spatial = spatial


def _flat(t: _Tensor) -> _Tensor:
    return _Tensor(keras.layers.Flatten()(t.value), False) if t.spatial else t


def _spatial(t: _Tensor) -> _Tensor:
    if t.spatial:
        return t
    return _Tensor(keras.layers.Reshape((1, 1, t.value.shape[-1]))(t.value), True)


def _pad(t: _Tensor, pads: tuple[int, int, int, int]) -> _Tensor:
    if not any(pads):
        return t
    top, bottom, left, right = pads
    return _Tensor(keras.layers.ZeroPadding2D(((top, bottom), (left, right)))(t.value), True)


def _build_keras_graph(network: Network) -> tuple[keras.Input, dict[str, _Tensor], dict]:
    """Keras tensors for every blob of the network, and the Keras layer of each weighted layer."""
    c, h, w = network.input_shape
    spatial_input = (h, w) != (1, 1) or len(network.input_declared_shape) == 3
    inputs = keras.Input(shape=(h, w, c) if spatial_input else (c,), name="input")
    blobs = {network.input_name: _Tensor(inputs, spatial_input)}
    weighted: dict[str, keras.layers.Layer] = {}
    for layer in network.layers:
        src = blobs[layer.input]
        if isinstance(layer, Convolution):
            explicit = layer.padding == "valid" and any(layer.pads)
            x = _pad(_spatial(src), layer.pads) if explicit else _spatial(src)
            conv = keras.layers.Conv2D(
                layer.out_channels, layer.kernel, strides=layer.stride,
                padding=layer.padding, use_bias=layer.has_bias, name=layer.name,
                trainable=layer.updatable,  # Core ML keeps non-updatable layers frozen
            )  # fmt: skip
            weighted[layer.name] = conv
            out = _Tensor(conv(x.value), True)
        elif isinstance(layer, Pooling):
            x = _spatial(src)
            if layer.kind == "max":
                pool = keras.layers.MaxPooling2D(layer.kernel, layer.stride, layer.padding)
            elif layer.padding == "same" and not layer.exclude_padding:
                # Core ML may count padded zeros in the average; Keras never does: pad first.
                x = _pad(x, layer.pads)
                pool = keras.layers.AveragePooling2D(layer.kernel, layer.stride, "valid")
            else:
                pool = keras.layers.AveragePooling2D(layer.kernel, layer.stride, layer.padding)
            out = _Tensor(pool(x.value), True)
        elif isinstance(layer, Activation):
            out = _Tensor(keras.layers.Activation(layer.function)(src.value), src.spatial)
        elif isinstance(layer, Flatten):
            x = src.value
            if src.spatial and layer.order == "channel_first":
                x = keras.layers.Permute((3, 1, 2))(x)  # N,H,W,C -> N,C,H,W
            out = _Tensor(keras.layers.Flatten()(x) if src.spatial else x, False)
        elif isinstance(layer, InnerProduct):
            dense = keras.layers.Dense(
                layer.out_features, use_bias=layer.has_bias, name=layer.name,
                trainable=layer.updatable,
            )  # fmt: skip
            weighted[layer.name] = dense
            out = _Tensor(dense(_flat(src).value), False)
        elif isinstance(layer, Softmax):
            out = _Tensor(keras.layers.Softmax(axis=-1)(src.value), src.spatial)
        else:  # parse_network admits nothing else
            raise UnsupportedModelError(f"{network.model_name}: layer '{layer.name}'")
        blobs[layer.output] = out
    return inputs, blobs, weighted


def _to_keras_kernel(name: str, value: np.ndarray) -> np.ndarray:
    # Core ML conv [outC, kC, kH, kW] -> Keras [kH, kW, kC, outC];
    # inner product [out, in] -> [in, out]
    if name.endswith(".weights"):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def _to_coreml_kernel(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith(".weights"):
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


class CoreMLEmulator:
    """An updatable Core ML model, emulated in TensorFlow. One instance per model."""

    def __init__(self, spec: Model_pb2.Model, model_name: str = "model") -> None:
        self.model_name = model_name
        self.spec = Model_pb2.Model()
        self.spec.CopyFrom(spec)
        self.network = parse_network(self.spec, model_name)
        self.update: UpdateParams | None = (
            parse_update_params(self.spec, self.network) if self.spec.isUpdatable else None
        )
        self._infos = parameter_infos(self.spec, model_name)
        self._inputs, self._blobs, self._weighted = _build_keras_graph(self.network)
        self._models: dict[tuple[str, ...], keras.Model] = {}
        self._load(get_parameters(self.spec, model_name, include_frozen=True))

    # -- parameters ---------------------------------------------------------------------------

    def _load(self, parameters: list[tuple[str, np.ndarray]]) -> None:
        values = dict(parameters)
        for layer_name in dict.fromkeys(name.rsplit(".", 1)[0] for name in values):
            keras_layer = self._weighted[layer_name]
            weights = [_to_keras_kernel(f"{layer_name}.weights", values[f"{layer_name}.weights"])]
            if f"{layer_name}.bias" in values:
                weights.append(values[f"{layer_name}.bias"])
            keras_layer.set_weights(weights)

    def get_parameters(self) -> list[tuple[str, np.ndarray]]:
        """Every updatable parameter, Core ML layout and names, in the spec's order."""
        result = []
        for info in self._infos:
            keras_layer = self._weighted[info.layer]
            index = 0 if info.field == "weights" else 1
            value = np.asarray(keras_layer.get_weights()[index], dtype=np.float32)
            result.append((info.name, np.ascontiguousarray(_to_coreml_kernel(info.name, value))))
        return result

    def set_parameters(self, parameters: list[tuple[str, np.ndarray]] | dict) -> None:
        """Load updatable parameters (Core ML layout), e.g. a new global model's."""
        arrays = check_parameters(self._infos, parameters)
        self._load([(info.name, value) for info, value in zip(self._infos, arrays, strict=True)])

    def updated_spec(self) -> Model_pb2.Model:
        """A copy of the spec with the current parameters written in."""
        spec = Model_pb2.Model()
        spec.CopyFrom(self.spec)
        set_parameters(spec, self.get_parameters(), self.model_name, infos=self._infos)
        return spec

    # -- inference ----------------------------------------------------------------------------

    def _keras_inputs(self, inputs: np.ndarray) -> np.ndarray:
        x = self.network.input_batch(inputs)  # N, C, H, W
        if self._blobs[self.network.input_name].spatial:
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x.reshape(len(x), -1)

    def _model_for(self, names: tuple[str, ...]) -> keras.Model:
        if names not in self._models:
            missing = [n for n in names if n not in self._blobs]
            if missing:
                raise ParameterError(f"{self.model_name}: no blob named {', '.join(missing)}")
            self._models[names] = keras.Model(self._inputs, [self._blobs[n].value for n in names])
        return self._models[names]

    def predict(
        self, inputs: np.ndarray, outputs: list[str] | None = None, batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """Forward pass; each output as N x its declared shape in Core ML layout."""
        names = tuple(outputs) if outputs is not None else tuple(self.network.outputs)
        x = self._keras_inputs(inputs)
        raw = self._model_for(names).predict(x, batch_size=batch_size, verbose=0)
        raw = raw if isinstance(raw, list) else [raw]
        result = {}
        for name, value in zip(names, raw, strict=True):
            value = np.asarray(value, dtype=np.float32)
            if self._blobs[name].spatial:
                value = value.transpose(0, 3, 1, 2)  # N,H,W,C -> N,C,H,W
            shape = self.network.example_shape(name)
            result[name] = value.reshape(len(x), *shape)
        return result

    def _probabilities_name(self) -> str:
        if self.update is not None:
            return self.update.loss.input
        if len(self.network.outputs) == 1:
            return next(iter(self.network.outputs))
        raise UnsupportedModelError(
            f"{self.model_name}: not updatable and has several outputs; name one to evaluate"
        )

    def evaluate(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """(cross-entropy loss, accuracy) on labelled examples."""
        name = self._probabilities_name()
        return classification_metrics(self.predict(inputs, [name])[name], labels)

    # -- training -----------------------------------------------------------------------------

    def _optimizer(self, config: TrainingConfig) -> keras.optimizers.Optimizer:
        if config.optimizer == "adam":
            return keras.optimizers.Adam(
                learning_rate=config.learning_rate,
                beta_1=config.hyper["beta1"],
                beta_2=config.hyper["beta2"],
                epsilon=config.hyper["eps"],
            )
        return keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=config.hyper["momentum"]
        )

    def train(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        seed: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> TrainResult:
        """Run one update task over (inputs, integer class labels).

        ``seed`` fixes the shuffle order when the spec itself sets no seed.
        """
        if self.update is None:
            raise UnsupportedModelError(f"{self.model_name}: is not updatable")
        config = self.update.resolve(epochs, batch_size, learning_rate)
        x = self._keras_inputs(inputs)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(x):
            raise ParameterError(f"{len(x)} examples but {len(labels)} labels")
        if len(x) == 0:
            raise ParameterError(f"{self.model_name}: no training examples")
        probabilities = self._blobs[config.loss.input]
        n_classes = int(probabilities.value.shape[-1])
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ParameterError(
                f"labels must lie in [0, {n_classes - 1}] for the model's {n_classes} outputs"
            )
        if config.loss.kind == "categorical_cross_entropy":
            targets = labels
            loss = keras.losses.SparseCategoricalCrossentropy()
            accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        else:
            targets = np.eye(n_classes, dtype=np.float32)[labels]
            loss = keras.losses.MeanSquaredError()
            accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
        model = self._model_for((config.loss.input,))
        model.compile(optimizer=self._optimizer(config), loss=loss, metrics=[accuracy])

        dataset = tf.data.Dataset.from_tensor_slices((x, targets))
        if config.shuffle:
            shuffle_seed = config.seed if config.seed is not None else seed
            dataset = dataset.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)

        history: list[dict[str, float]] = []

        class _Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                entry = {k: float(v) for k, v in (logs or {}).items()}
                history.append(entry)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, entry)

        start = time.perf_counter()
        model.fit(dataset, epochs=config.epochs, verbose=0, shuffle=False, callbacks=[_Record()])
        seconds = time.perf_counter() - start
        last = history[-1]
        return TrainResult(
            parameters=self.get_parameters(),
            num_examples=len(x),
            loss=last["loss"],
            accuracy=last["accuracy"],
            config=config,
            seconds=seconds,
            history=history,
        )
