"""Import coremltools without its Linux import noise and without dragging in TensorFlow.

On Linux, ``import coremltools`` logs "Failed to load _MLModelProxy ..." for every native
runtime proxy it cannot load, warns that the installed TensorFlow is untested, and imports
TensorFlow as a side effect (seconds of start-up, and the coordinator must never load it).
fedcoreml only uses the spec protobufs and the NeuralNetworkBuilder, so neither matters.
Import coremltools through this module only.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType


class _DropRuntimeNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Failed to load _ML")
            or "has not been tested with coremltools" in message
        )


def _import_coremltools() -> ModuleType:
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    noise = _DropRuntimeNoise()
    ct_logger = logging.getLogger("coremltools")
    ct_logger.addFilter(noise)
    # coremltools probes for TensorFlow (and PyTorch) at import time only to enable model
    # converters, which fedcoreml does not use; a None entry in sys.modules makes that probe
    # fail fast. An already-imported framework is left alone.
    blocked = [name for name in ("tensorflow", "torch") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import coremltools
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
        ct_logger.removeFilter(noise)
    # Keep the "Failed to load" lines out of later lazy imports inside coremltools too.
    ct_logger.addFilter(noise)
    return coremltools


ct = _import_coremltools()

from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402
from coremltools.models.neural_network.update_optimizer_utils import (  # noqa: E402
    AdamParams,
    SgdParams,
)
from coremltools.proto import Model_pb2, NeuralNetwork_pb2  # noqa: E402

__all__ = [
    "AdamParams",
    "Model_pb2",
    "NeuralNetworkBuilder",
    "NeuralNetwork_pb2",
    "SgdParams",
    "ct",
    "datatypes",
]
