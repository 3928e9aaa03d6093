"""Per-device bearer tokens, kept only as SHA-256 hashes in ``<run-dir>/tokens.json``.

A token is issued for one device id (or, of kind ``dashboard``, for one viewer of the coordinator's
web dashboard) and shown once (``fcm_`` + 43 URL-safe characters, 256
random bits); the store keeps its hash, the device id, a short prefix to name it by, the time it
was created and whether it was revoked. The gateway calls :meth:`TokenStore.verify` on every
device RPC; it re-reads the file whenever it changed on disk, so ``fedcoreml tokens revoke`` run
by another process takes effect on the next call.

Tokens carry 256 random bits, so a plain SHA-256 (no slow key derivation) is enough: a stolen
``tokens.json`` reveals no usable secret. Lookups go by hash, and the final comparison uses
:func:`hmac.compare_digest`.

Devices read their tokens from a *token file* (:mod:`fedcoreml.ios_bridge.token_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcoreml.ios_bridge.atomic_file import SECRET_FILE_MODE, write_text_atomic
from fedcoreml.ios_bridge.channel import DEVICE_ID_RULE, valid_device_id
from fedcoreml.ios_bridge.echo import capped, shown
from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.server.gateway.refusals import (
    MISSING_TOKEN,
    TOKEN_STORE_UNREADABLE,
    UNKNOWN_TOKEN,
)

__all__ = [
    "DASHBOARD",
    "DEVICE",
    "TOKENS_FILE",
    "TOKEN_KINDS",
    "TOKEN_PREFIX",
    "TokenError",
    "TokenInfo",
    "TokenStore",
    "check_device_id",
    "hash_token",
]

log = logging.getLogger("fedcoreml.gateway")

TOKENS_FILE = "tokens.json"
TOKEN_PREFIX = "fcm_"
_FORMAT_VERSION = 1
_SHOWN_CHARS = 8  # random characters of a token kept (after "fcm_") to name it in listings
_MIN_PREFIX = len(TOKEN_PREFIX) + 4  # a shorter prefix would match too many tokens

#: What a token opens: the device protocol, or the read-only web dashboard (``--dashboard``).
#: A token of one kind is refused by the other.
DEVICE = "device"
DASHBOARD = "dashboard"
TOKEN_KINDS = (DEVICE, DASHBOARD)


class TokenError(FedCoreMLError):
    """A token operation that cannot be done: unreadable store, unknown device or prefix."""


@dataclass(frozen=True)
class TokenInfo:
    """One issued token, without its secret: what ``list`` shows and ``tokens.json`` holds."""

    device_id: str
    prefix: str  # the token's first characters, e.g. "fcm_Ab3dE9xQ"; names it, reveals nothing
    sha256: str
    created: str  # ISO 8601, UTC
    revoked: bool = False
    revoked_at: str | None = None
    kind: str = DEVICE  # one of TOKEN_KINDS; entries written before kinds existed are devices

    @property
    def status(self) -> str:
        return f"revoked {self.revoked_at}" if self.revoked else "active"


def hash_token(secret: str) -> str:
    """The hex SHA-256 of a token, as stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_device_id(device_id: str) -> None:
    """Refuse a device id the gateway would refuse at ``Register``."""
    if not valid_device_id(device_id):
        raise TokenError(f"device id must be {DEVICE_ID_RULE}, got {shown(device_id)}")


class TokenStore:
    """The tokens of one run directory (``<run_dir>/tokens.json``); safe to share across threads.

    ``create``/``revoke`` rewrite the file atomically under an advisory lock, so several
    ``fedcoreml tokens`` invocations cannot lose each other's changes; every call first re-reads
    the file if its modification time, size or inode changed.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / TOKENS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[TokenInfo] = []
        self._by_hash: dict[str, TokenInfo] = {}
        with self._lock:
            self._reload_if_changed()  # a corrupt file is reported now, not at the first RPC

    # -- queries -------------------------------------------------------------------------------

    def list(self) -> list[TokenInfo]:
        """Every token ever issued here (active and revoked), oldest first; never a secret."""
        with self._lock:
            self._reload_if_changed()
            return list(self._entries)

    def has_active(self, kind: str = DEVICE) -> bool:
        """Whether any token of ``kind`` is active."""
        return any(info.kind == kind and not info.revoked for info in self.list())

    def verify(self, secret: str | None, kind: str = DEVICE) -> str:
        """The device id (for a dashboard token: the viewer's name) ``secret`` was issued for.

        Raises GatewayError ``UNAUTHENTICATED`` for a missing, unknown or revoked token, or one
        of another kind, and
        ``UNAVAILABLE`` while ``tokens.json`` cannot be read (the device retries; nobody gets in).
        """
        if not secret:
            raise MISSING_TOKEN.error()
        digest = hash_token(secret)
        with self._lock:
            try:
                self._reload_if_changed()
            except TokenError as exc:
                log.error("%s", capped(str(exc)))
                raise TOKEN_STORE_UNREADABLE.error() from None
            entry = self._by_hash.get(digest)
        if (
            entry is None
            or entry.revoked
            or entry.kind != kind
            or not hmac.compare_digest(entry.sha256, digest)
        ):
            raise UNKNOWN_TOKEN.error()
        return entry.device_id

    # -- changes ------------------------------------------------------------------------------

    def create(self, device_id: str, kind: str = DEVICE) -> str:
        """Issue a new token for ``device_id`` and return its secret (the only time it is seen).

        A device may hold several active tokens (to rotate: create, deploy, revoke the old one
        by its prefix). ``kind`` ``dashboard``: a token for the web dashboard, ``device_id``
        naming its viewer (the same characters as a device id).
        """
        if kind not in TOKEN_KINDS:
            raise TokenError(
                f"token kind must be one of {', '.join(TOKEN_KINDS)}, got {shown(kind)}"
            )
        check_device_id(device_id)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(
            device_id=device_id,
            prefix=secret[: len(TOKEN_PREFIX) + _SHOWN_CHARS],
            sha256=hash_token(secret),
            created=_now(),
            kind=kind,
        )
        with self._mutating() as entries:
            entries.append(info)
        return secret

    def revoke(self, target: str) -> list[TokenInfo]:
        """Revoke every active token of device ``target``, or the one token ``target`` names.

        ``target`` is a device id, a token's prefix as ``list`` shows it (or a longer part of
        the token), or the whole token. Returns the tokens revoked (none if all were revoked
        already); raises TokenError when nothing matches or a prefix matches several tokens.
        """
        with self._mutating() as entries:
            indices = _matching(entries, target)
            stamp = _now()
            revoked = []
            for index in indices:
                if not entries[index].revoked:
                    entries[index] = replace(entries[index], revoked=True, revoked_at=stamp)
                    revoked.append(entries[index])
        return revoked

    # -- the file -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[list[TokenInfo]]:
        """The current entries, to change in place; written back atomically on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with self._lock, open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            self._reload_if_changed()
            entries = list(self._entries)
            yield entries
            write_text_atomic(self.path, _dump(entries), mode=SECRET_FILE_MODE)
            self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._set_entries([], None)
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._set_entries(_load(self.path), stamp)

    def _set_entries(self, entries: list[TokenInfo], stamp: tuple[int, int, int] | None) -> None:
        self._entries = entries
        self._by_hash = {entry.sha256: entry for entry in entries}
        self._stamp = stamp


def _matching(entries: list[TokenInfo], target: str) -> list[int]:
    """Indices of the entries ``target`` names: a device id, a token prefix or a whole token."""
    by_device = [i for i, entry in enumerate(entries) if entry.device_id == target]
    if by_device:
        return by_device
    digest = hash_token(target)
    by_hash = [i for i, entry in enumerate(entries) if hmac.compare_digest(entry.sha256, digest)]
    if by_hash:
        return by_hash
    if target.startswith(TOKEN_PREFIX) and len(target) >= _MIN_PREFIX:
        by_prefix = [
            i
            for i, entry in enumerate(entries)
            if entry.prefix.startswith(target) or target.startswith(entry.prefix)
        ]
        if len(by_prefix) > 1:
            names = ", ".join(f"{entries[i].prefix} ({entries[i].device_id})" for i in by_prefix)
            raise TokenError(
                f"{shown(target)} matches several tokens: {names}; give more characters"
            )
        if by_prefix:
            return by_prefix
    raise TokenError(f"no device or token matches {shown(target)} (see `fedcoreml tokens list`)")


def _load(path: Path) -> list[TokenInfo]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported version {document.get('version')!r}")
        return [TokenInfo(**entry) for entry in document["tokens"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TokenError(f"{path}: not a readable token store ({exc})") from None


def _dump(entries: list[TokenInfo]) -> str:
    document: dict[str, Any] = {
        "version": _FORMAT_VERSION,
        "tokens": [asdict(entry) for entry in entries],
    }
    return json.dumps(document, indent=2) + "\n"
