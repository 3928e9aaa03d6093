"""Errors raised for models and parameters that fedcoreml cannot accept.

Each one is a ``ValueError`` whose message names the model or layer and what was expected,
so that a CLI can print it as it is and a gateway can pass it back to a device.
"""

from __future__ import annotations


class FedCoreMLError(ValueError):
    """Base of the errors that describe bad input; the CLI prints their message as it is."""


class ModelFormatError(FedCoreMLError):
    """A file or byte string is not a readable Core ML model."""


class UnsupportedModelError(FedCoreMLError):
    """A valid Core ML model that fedcoreml cannot train or interpret (names model and layer)."""


class ParameterError(FedCoreMLError):
    """Parameters that do not fit a model: wrong name, shape, dtype, or non-finite values."""


class TrainingConfigError(FedCoreMLError):
    """A training override (epochs, batch size, learning rate) the model does not allow."""
