"""Global models as devices receive them: parameters -> the exact .mlmodel bytes, built once.

The store keeps the base spec (architecture, loss, optimizer) and writes a new parameter set into
it when asked; the last few results are cached by a fingerprint of the parameters, so the model
that is shipped for training, shipped for evaluation, evaluated on the server and saved as the
round's file is one and the same byte string.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from fedcoreml.ios_bridge.coremltools_quiet import Model_pb2
from fedcoreml.ios_bridge.errors import ParameterError
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.parameters import ParameterInfo, parameter_infos, set_parameters
from fedcoreml.server.gateway.task_board import RoundModel

Parameters = list[tuple[str, np.ndarray]]


def fingerprint(parameters: Parameters) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, value in parameters:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class ModelStore:
    """Builds RoundModels from parameter lists for one architecture."""

    def __init__(self, base_spec: Model_pb2.Model, model_name: str, cache_size: int = 4) -> None:
        self.model_name = model_name
        self._spec = Model_pb2.Model()
        self._spec.CopyFrom(base_spec)
        self.infos: list[ParameterInfo] = parameter_infos(self._spec, model_name)
        self._cache: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def as_float32(self, parameters: Parameters) -> Parameters:
        """Strategies may hand back float64; Core ML stores float32."""
        converted = []
        for name, value in parameters:
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.floating):
                raise ParameterError(f"parameter {name}: expected floats, got {array.dtype}")
            converted.append((name, array.astype(np.float32, copy=False)))
        return converted

    def build(self, parameters: Parameters, version: int) -> RoundModel:
        """The .mlmodel holding ``parameters``; ParameterError if they do not fit the model."""
        parameters = self.as_float32(parameters)
        key = fingerprint(parameters)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                set_parameters(self._spec, parameters, self.model_name, infos=self.infos)
                built = RoundModel.from_bytes(version, spec_to_bytes(self._spec))
                cached = self._cache[key] = (built.data, built.sha256)  # hashed once
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        data, sha256 = cached
        return RoundModel(version, data, sha256)
