"""Channel conventions shared by every device and the coordinator, as constants and helpers.

What an app (or a simulated device) must agree on with the coordinator beyond the messages in
``protos/``: how it authenticates (``authorization: Bearer <token>`` call metadata), how it
trusts the coordinator (a CA certificate), the trailing-metadata key of a rate-limit answer,
message and chunk size limits, and which device ids are valid. ``protos/README.md`` states the
same rules for app developers; the coordinator enforces them from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc

from fedcoreml.ios_bridge.errors import FedCoreMLError

__all__ = [
    "AUTHORIZATION_KEY",
    "CHANNEL_OPTIONS",
    "DEFAULT_CHUNK_BYTES",
    "DEVICE_ID_RULE",
    "MAX_DEVICE_ID_LENGTH",
    "MAX_MESSAGE_BYTES",
    "RETRY_AFTER_KEY",
    "TLSConfigError",
    "bearer_metadata",
    "channel_credentials",
    "open_channel",
    "read_pem",
    "valid_device_id",
]

#: Every message either way is at most this long (grpc-swift's default receive limit).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Payload of one model-download or tensor chunk: leaves room for the name, shape and framing.
DEFAULT_CHUNK_BYTES = 1024 * 1024
#: Call metadata key that carries ``Bearer <token>`` on every RPC when tokens are required.
AUTHORIZATION_KEY = "authorization"
#: Trailing metadata key of a ``RESOURCE_EXHAUSTED`` answer: milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"
#: The message limits a phone's gRPC stack has, both ways.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

MAX_DEVICE_ID_LENGTH = 128
#: A device id: 1-128 of ASCII letters, digits and ``. _ : -`` (a UUID, ``sim-000``, ...).
DEVICE_ID_RULE = f"1-{MAX_DEVICE_ID_LENGTH} characters from A-Z a-z 0-9 . _ : -"
_DEVICE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_DEVICE_ID_LENGTH}}}")

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


class TLSConfigError(FedCoreMLError):
    """A certificate or key file that cannot be used (names the file and the reason)."""


def valid_device_id(device_id: str) -> bool:
    """Whether ``device_id`` follows :data:`DEVICE_ID_RULE`."""
    return _DEVICE_ID.fullmatch(device_id) is not None


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates as the holder of ``token``."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def read_pem(path: str | os.PathLike[str], what: str, marker: bytes) -> bytes:
    """The bytes of a PEM file holding a ``marker`` block; TLSConfigError naming it otherwise."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {file}: no such file") from None
    except OSError as exc:
        raise TLSConfigError(f"{what} {file}: cannot read it ({exc.strerror or exc})") from None
    if marker not in data:
        raise TLSConfigError(
            f"{what} {file}: not PEM (expected a '{marker.decode().strip('-')}' block)"
        )
    return data


def channel_credentials(ca_cert_path: str | os.PathLike[str]) -> grpc.ChannelCredentials:
    """TLS credentials for a device's channel, trusting the CA certificate(s) in the file."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_cert_path, "CA certificate", _CERT_MARKER)
    )


def open_channel(address: str, ca_cert: str | os.PathLike[str] | None = None) -> grpc.Channel:
    """A channel to ``address`` with the phone's message limits: TLS if ``ca_cert`` is given."""
    if ca_cert is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, channel_credentials(ca_cert), options=CHANNEL_OPTIONS)
