"""Device token files: the JSON object mapping each device id to its bearer token.

``{"sim-000": "fcm_...", "sim-001": "fcm_..."}``: what ``fedcoreml tokens create --out FILE``
writes and ``fedcoreml devices --token-file FILE`` reads. Written readable by its owner only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedcoreml.ios_bridge.atomic_file import SECRET_FILE_MODE, write_text_atomic
from fedcoreml.ios_bridge.errors import FedCoreMLError

__all__ = ["TokenFileError", "read_token_file", "write_token_file"]


class TokenFileError(FedCoreMLError):
    """A token file that cannot be read or is not a JSON object of device ids to tokens."""


def read_token_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """A device token file: a JSON object mapping each device id to its token."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenFileError(
            f"{path}: cannot read the token file ({exc.strerror or exc})"
        ) from None
    except ValueError as exc:
        raise TokenFileError(
            f'{path}: not JSON ({exc}); expected {{"DEVICE_ID": "TOKEN"}}'
        ) from None
    if not isinstance(document, dict) or not all(
        isinstance(device, str) and isinstance(token, str) and token
        for device, token in document.items()
    ):
        raise TokenFileError(
            f'{path}: expected a JSON object of device ids to tokens, {{"DEVICE_ID": "TOKEN"}}'
        )
    return dict(document)


def write_token_file(path: str | os.PathLike[str], tokens: Mapping[str, str]) -> Path:
    """Write (or add to) a token file, readable by its owner only; returns its path."""
    target = Path(path)
    merged = read_token_file(target) if target.exists() else {}
    merged.update(tokens)
    write_text_atomic(
        target, json.dumps(merged, indent=2, sort_keys=True) + "\n", mode=SECRET_FILE_MODE
    )
    return target
