"""Refusals of device requests, each carrying the gRPC status it maps to."""

from __future__ import annotations

from fedcoreml.ios_bridge.errors import FedCoreMLError


class GatewayError(FedCoreMLError):
    """A request the gateway refuses. ``code`` is a ``grpc.StatusCode`` member name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFoundError(GatewayError):
    code = "NOT_FOUND"


class PermissionDeniedError(GatewayError):
    code = "PERMISSION_DENIED"


class FailedPreconditionError(GatewayError):
    code = "FAILED_PRECONDITION"


class OutOfRangeError(GatewayError):
    code = "OUT_OF_RANGE"
