"""The exception a gateway refusal travels as, from where it is found to the gRPC status."""

from __future__ import annotations

from fedcoreml.ios_bridge.errors import FedCoreMLError


class GatewayError(FedCoreMLError):
    """A request the gateway refuses.

    ``code`` is a ``grpc.StatusCode`` member name; ``key`` names the row of the refusal table
    (:mod:`fedcoreml.server.gateway.refusals`) the error was raised from.
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", key: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.key = key
