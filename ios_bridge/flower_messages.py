"""The contract between fedcoreml's ServerApp and ClientApp on Flower's runtime.

Flower carries the global parameters as an ``ArrayRecord`` (Core ML layout and names, e.g.
``conv1.weights`` as ``[out, in, kh, kw]``) and the settings as a ``ConfigRecord``. The config
also holds the model's bare architecture (:func:`~fedcoreml.ios_bridge.parameters.strip_parameters`,
a few KB), from which a node rebuilds, with the arrays, exactly the .mlmodel a device would
download. Replies carry the updated ``ArrayRecord`` and a ``MetricRecord`` with ``num-examples``,
``loss``, ``accuracy`` (and ``train-seconds`` for training).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import fill_parameters

EPOCHS_KEY = "local-epochs"
BATCH_SIZE_KEY = "batch-size"
LEARNING_RATE_KEY = "lr"
ROUND_KEY = "server-round"  # set by Flower's strategies in every message's config
ARCHITECTURE_KEY = "mlmodel-architecture"
# The MetricRecord a node's reply carries (Flower's strategies weight by NUM_EXAMPLES_KEY).
NUM_EXAMPLES_KEY = "num-examples"
LOSS_KEY = "loss"
ACCURACY_KEY = "accuracy"
TRAIN_SECONDS_KEY = "train-seconds"  # a train reply's wall time of local training


class MessageContentError(FedCoreMLError):
    """A message without what the other side needs (arrays, architecture)."""


def arrays_to_parameters(arrays: ArrayRecord) -> list[tuple[str, np.ndarray]]:
    return [(name, array.numpy()) for name, array in arrays.items()]


def parameters_to_arrays(parameters: Iterable[tuple[str, np.ndarray]]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in parameters})


def model_from_message(arrays: ArrayRecord, config: ConfigRecord) -> Model_pb2.Model:
    """The .mlmodel a device would receive: the architecture with the message's parameters."""
    architecture = config.get(ARCHITECTURE_KEY)
    if not isinstance(architecture, bytes):
        raise MessageContentError(
            f"the message's config has no '{ARCHITECTURE_KEY}': not sent by fedcoreml's ServerApp"
        )
    return fill_parameters(spec_from_bytes(architecture), arrays_to_parameters(arrays))
