"""The training half of an updatable spec: loss, optimizer, epochs, shuffle, and allowed overrides.

``parse_update_params`` reads what Core ML's ``MLUpdateTask`` would use; ``resolve`` applies the
per-call overrides an app (or the coordinator) may pass — epochs, mini-batch size, learning rate —
and refuses any outside the values the spec allows, exactly as Core ML does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2, NeuralNetwork_pb2
from fedcoreml.ios_bridge.errors import TrainingConfigError, UnsupportedModelError
from fedcoreml.ios_bridge.network import Network, Softmax, neural_network_of


@dataclass(frozen=True)
class DoubleRange:
    default: float
    minimum: float
    maximum: float

    def allows(self, value: float) -> bool:
        return self.minimum <= value <= self.maximum

    def describe(self) -> str:
        return f"[{self.minimum:g}, {self.maximum:g}]"


@dataclass(frozen=True)
class IntChoice:
    """An Int64Parameter: a default and either a set of allowed values or a range."""

    default: int
    allowed_set: tuple[int, ...] | None
    minimum: int | None = None
    maximum: int | None = None

    def allows(self, value: int) -> bool:
        if self.allowed_set is not None:
            return value in self.allowed_set
        lo = self.minimum if self.minimum is not None else 1
        hi = self.maximum if self.maximum is not None else 2**63 - 1
        return lo <= value <= hi

    def describe(self) -> str:
        if self.allowed_set is not None:
            return "{" + ", ".join(str(v) for v in self.allowed_set) + "}"
        return f"[{self.minimum}, {self.maximum}]"


@dataclass(frozen=True)
class Loss:
    kind: Literal["categorical_cross_entropy", "mean_squared_error"]
    name: str
    input: str  # the network output the loss reads (probabilities for cross-entropy)
    target: str  # the training input that carries the truth


@dataclass(frozen=True)
class Optimizer:
    kind: Literal["adam", "sgd"]
    learning_rate: DoubleRange
    batch_size: IntChoice
    # sgd: momentum; adam: beta1, beta2, eps
    hyper: dict[str, DoubleRange]


@dataclass(frozen=True)
class UpdateParams:
    loss: Loss
    optimizer: Optimizer
    epochs: IntChoice
    shuffle: bool
    seed: int | None

    def resolve(
        self,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
    ) -> TrainingConfig:
        """The configuration one update task runs with, after checking each override."""
        chosen_epochs = self.epochs.default if epochs is None else int(epochs)
        chosen_batch = self.optimizer.batch_size.default if batch_size is None else int(batch_size)
        chosen_lr = (
            self.optimizer.learning_rate.default if learning_rate is None else float(learning_rate)
        )
        if not self.epochs.allows(chosen_epochs):
            raise TrainingConfigError(
                f"epochs={chosen_epochs} is not allowed by the model (allowed: "
                f"{self.epochs.describe()})"
            )
        if not self.optimizer.batch_size.allows(chosen_batch):
            raise TrainingConfigError(
                f"batch size {chosen_batch} is not allowed by the model (allowed: "
                f"{self.optimizer.batch_size.describe()})"
            )
        if not self.optimizer.learning_rate.allows(chosen_lr):
            raise TrainingConfigError(
                f"learning rate {chosen_lr:g} is outside the model's allowed range "
                f"{self.optimizer.learning_rate.describe()}"
            )
        return TrainingConfig(
            loss=self.loss,
            optimizer=self.optimizer.kind,
            epochs=chosen_epochs,
            batch_size=chosen_batch,
            learning_rate=chosen_lr,
            hyper={k: v.default for k, v in self.optimizer.hyper.items()},
            shuffle=self.shuffle,
            seed=self.seed,
        )


@dataclass(frozen=True)
class TrainingConfig:
    loss: Loss
    optimizer: Literal["adam", "sgd"]
    epochs: int
    batch_size: int
    learning_rate: float
    hyper: dict[str, float]
    shuffle: bool
    seed: int | None


def _double(param: NeuralNetwork_pb2.DoubleParameter) -> DoubleRange:
    if param.WhichOneof("AllowedValues") == "range":
        return DoubleRange(param.defaultValue, param.range.minValue, param.range.maxValue)
    return DoubleRange(param.defaultValue, param.defaultValue, param.defaultValue)


def _int(param: NeuralNetwork_pb2.Int64Parameter) -> IntChoice:
    allowed = param.WhichOneof("AllowedValues")
    if allowed == "set":
        return IntChoice(int(param.defaultValue), tuple(int(v) for v in param.set.values))
    if allowed == "range":
        return IntChoice(
            int(param.defaultValue), None, int(param.range.minValue), int(param.range.maxValue)
        )
    return IntChoice(int(param.defaultValue), (int(param.defaultValue),))


def parse_update_params(spec: Model_pb2.Model, network: Network) -> UpdateParams:
    """Read the update parameters of an updatable spec (``network`` from ``parse_network``)."""
    model = network.model_name
    if not spec.isUpdatable:
        raise UnsupportedModelError(
            f"{model}: is not updatable (isUpdatable is false); Core ML cannot train it on a device"
        )
    if not network.trainable_layers:
        raise UnsupportedModelError(f"{model}: no layer is marked updatable")
    updates = neural_network_of(spec, model).updateParams
    if len(updates.lossLayers) != 1:
        raise UnsupportedModelError(
            f"{model}: has {len(updates.lossLayers)} loss layers; expected exactly one"
        )
    raw_loss = updates.lossLayers[0]
    loss_kind = raw_loss.WhichOneof("LossLayerType")
    if loss_kind == "categoricalCrossEntropyLossLayer":
        body = raw_loss.categoricalCrossEntropyLossLayer
        producer = next((layer for layer in network.layers if layer.output == body.input), None)
        if not isinstance(producer, Softmax):
            raise UnsupportedModelError(
                f"{model}: loss layer '{raw_loss.name}': categorical cross-entropy must read a "
                f"softmax output, but '{body.input}' is not one"
            )
        loss = Loss("categorical_cross_entropy", raw_loss.name, body.input, body.target)
    elif loss_kind == "meanSquaredErrorLossLayer":
        body = raw_loss.meanSquaredErrorLossLayer
        if not any(layer.output == body.input for layer in network.layers):
            raise UnsupportedModelError(
                f"{model}: loss layer '{raw_loss.name}' reads '{body.input}', which no layer makes"
            )
        loss = Loss("mean_squared_error", raw_loss.name, body.input, body.target)
    else:
        raise UnsupportedModelError(f"{model}: loss layer '{raw_loss.name}' has no loss type")
    if body.target not in {f.name for f in spec.description.trainingInput}:
        raise UnsupportedModelError(
            f"{model}: loss target '{body.target}' is not among the model's training inputs"
        )

    kind = updates.optimizer.WhichOneof("OptimizerType")
    if kind == "adamOptimizer":
        adam = updates.optimizer.adamOptimizer
        optimizer = Optimizer(
            "adam",
            _double(adam.learningRate),
            _int(adam.miniBatchSize),
            {"beta1": _double(adam.beta1), "beta2": _double(adam.beta2), "eps": _double(adam.eps)},
        )
    elif kind == "sgdOptimizer":
        sgd = updates.optimizer.sgdOptimizer
        optimizer = Optimizer(
            "sgd",
            _double(sgd.learningRate),
            _int(sgd.miniBatchSize),
            {"momentum": _double(sgd.momentum)},
        )
    else:
        raise UnsupportedModelError(f"{model}: no optimizer (expected SGD or Adam)")
    if optimizer.batch_size.default < 1:
        raise UnsupportedModelError(f"{model}: mini-batch size must be at least 1")

    epochs = _int(updates.epochs) if updates.HasField("epochs") else IntChoice(1, (1,))
    shuffle = updates.shuffle.defaultValue if updates.HasField("shuffle") else True
    seed = int(updates.seed.defaultValue) if updates.HasField("seed") else None
    return UpdateParams(loss, optimizer, epochs, bool(shuffle), seed)
