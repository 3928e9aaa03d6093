"""The Python API for embedding fedcoreml: run a coordinator, read a run, predict with a model.

One import for what an application embedding fedcoreml needs (the names are those of the
modules that define them, re-exported; nothing here loads TensorFlow)::

    from fedcoreml.server.api import CoordinatorConfig, coordinator, predict, read_run

    config = CoordinatorConfig(run_dir=Path("runs/app"), rounds=5, min_devices=10,
                               listen="0.0.0.0:50051", tls_cert=cert, tls_key=key)
    with coordinator(config, on_round=print) as running:   # listening on running.port
        final_model = running.run()                         # blocks until the last round

    view = read_run("runs/app")           # config, models (sha256, size), metrics, state
    print(view.state, [m.test_accuracy for m in view.metrics])
    answer = predict(view.latest_model.path, "digit.png")   # or a .npy, PNG bytes, an array
    print(answer.label, answer.probabilities)

* :class:`Coordinator`, :class:`CoordinatorConfig` (every ``fedcoreml server`` option),
  :class:`RoundRecord` (what ``on_round`` receives), :func:`coordinator` (start, and stop
  however the block ends), :meth:`Coordinator.resume` (continue a stopped run);
* :func:`read_run` and its :class:`RunView`, :class:`ModelVersion`, :class:`MetricsLine`;
* :func:`predict`, :class:`Predictor` (one model, many images), :class:`Prediction`,
  :func:`load_image`, :func:`takes_digit_image` / :func:`check_digit_model`;
* :func:`write_report` / :func:`render_report` (needs the ``report`` extra: matplotlib).

Errors from bad input derive from :class:`FedCoreMLError` and name what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.ios_bridge.predict import (
    ImageInputError,
    NotADigitModelError,
    Prediction,
    Predictor,
    check_digit_model,
    load_image,
    predict,
    takes_digit_image,
)
from fedcoreml.server.coordinator import (
    Coordinator,
    CoordinatorConfig,
    CoordinatorConfigError,
    RoundRecord,
)
from fedcoreml.server.report import render_report, write_report
from fedcoreml.server.run_dir import RunDirectoryError
from fedcoreml.server.run_view import MetricsLine, ModelVersion, RunView, read_run

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorConfigError",
    "FedCoreMLError",
    "ImageInputError",
    "MetricsLine",
    "ModelVersion",
    "NotADigitModelError",
    "Prediction",
    "Predictor",
    "RoundRecord",
    "RunDirectoryError",
    "RunView",
    "check_digit_model",
    "coordinator",
    "load_image",
    "predict",
    "read_run",
    "render_report",
    "takes_digit_image",
    "write_report",
]


@contextmanager
def coordinator(
    config: CoordinatorConfig, on_round: Callable[[RoundRecord], None] | None = None
) -> Iterator[Coordinator]:
    """A coordinator listening for devices (its port: ``.port``), stopped when the block ends.

    Call ``.run()`` inside the block to run every round (it blocks; returns final.mlmodel's
    path). The run directory is written as ``fedcoreml server`` writes it.
    """
    running = Coordinator(config, on_round=on_round)
    running.start()
    try:
        yield running
    finally:
        running.stop()
