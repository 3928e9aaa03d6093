"""The Models and Try it pages' work: a committed model's exact bytes, its summary, predictions.

A model version is looked up in the latest read of the run (:class:`RunFeed`'s view), and the
bytes of its file (``models/round-NNNN.mlmodel`` or ``final.mlmodel``) are checked against the
sha256 the run committed before they are served, summarised or asked anything: what the page
shows is what devices were sent.
Summaries (``fedcoreml model inspect``) and predictors are cached per sha256, a few at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedcoreml.ios_bridge.echo import shown
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex, spec_from_bytes
from fedcoreml.ios_bridge.model_info import describe
from fedcoreml.ios_bridge.predict import Prediction, Predictor, check_digit_model
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError
from fedcoreml.server.run_view import RunView

__all__ = ["FINAL", "ModelLookupError", "ModelShelf", "StoredModel"]

FINAL = "final"
_CACHED = 4  # models' summaries and predictors kept (a 2.3 MB model parses in ~50 ms)

T = TypeVar("T")


class ModelLookupError(FedCoreMLError):
    """A model version the run has not committed, or whose file is not what was committed."""


@dataclass(frozen=True)
class StoredModel:
    """A committed model's exact bytes. ``version``: its round, or ``final``."""

    version: int | str
    filename: str
    data: bytes
    sha256: str


class _Lru(Generic[T]):
    """A few values by key, built once each (two threads asking at once may both build)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._values: OrderedDict[str, T] = OrderedDict()

    def get(self, key: str, build: Callable[[], T]) -> T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = build()
        with self._lock:
            self._values[key] = value
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value


class ModelShelf:
    """The run's committed models, read on demand (thread-safe)."""

    def __init__(self, run_dir: RunDirectory, view: Callable[[], RunView | None]) -> None:
        self.run_dir = run_dir
        self._view = view  # the latest read of the run
        self._summaries: _Lru[dict[str, Any]] = _Lru(_CACHED)
        self._predictors: _Lru[Predictor | FedCoreMLError] = _Lru(_CACHED)

    def load(self, version: str) -> StoredModel:
        """The model ``version`` names (``3``, ``final``) as committed.

        Raises ModelLookupError when the run committed no such model, RunDirectoryError when
        its file is no longer the bytes committed.
        """
        view = self._view()
        if version == FINAL:
            if view is None or view.final_model is None:
                raise ModelLookupError("the run has no final model yet")
            committed, path, name = view.final_model, self.run_dir.final_model, "final.mlmodel"
            number: int | str = FINAL
        else:
            if not version.isascii() or not version.isdigit():
                raise ModelLookupError(
                    f"model version must be a round number or 'final', got {shown(version)}"
                )
            number = int(version)
            committed = (
                next((m for m in view.models if m.version == number), None) if view else None
            )
            if committed is None:
                raise ModelLookupError(f"round {number} has no committed model (yet)")
            path, name = self.run_dir.round_model(number), self.run_dir.round_model(number).name
        data = path.read_bytes()
        digest = sha256_hex(data)
        if digest != committed.sha256:  # the run directory was damaged after the commit
            raise RunDirectoryError(
                f"{path}: sha256 {digest[:12]}... is not the committed {committed.sha256[:12]}..."
            )
        return StoredModel(number, name, data, digest)

    def summary(self, model: StoredModel) -> dict[str, Any]:
        """``fedcoreml model inspect`` of the model, and whether Try it can ask it about a digit."""

        def build() -> dict[str, Any]:
            spec = spec_from_bytes(model.data, model.filename)
            info = describe(spec, model_name=model.filename)
            try:
                check_digit_model(spec, model.filename)
                digit = None
            except FedCoreMLError as exc:
                digit = str(exc)
            return {**info, "digit_input": digit is None, "digit_problem": digit}

        summary = self._summaries.get(model.sha256, build)
        return {
            "version": model.version,
            "filename": model.filename,
            "sha256": model.sha256,
            "size_bytes": len(model.data),
            **summary,
        }

    def predict(self, model: StoredModel, image: bytes) -> Prediction:
        """The model's prediction for a PNG image.

        Raises NotADigitModelError for a model that takes no 28x28 image, ImageInputError for
        an image that cannot be read.
        """

        def build() -> Predictor | FedCoreMLError:
            try:
                return Predictor(model.data, model.filename)
            except FedCoreMLError as exc:  # kept too: the same bytes will not change their mind
                return exc

        predictor = self._predictors.get(model.sha256, build)
        if isinstance(predictor, FedCoreMLError):
            raise predictor.with_traceback(None)  # the same instance, raised afresh
        return predictor.predict(image)
