"""Device authentication and per-device rate limiting for the gateway, as a gRPC interceptor.

:class:`DeviceAuthInterceptor` guards every ``DeviceService`` RPC (other services pass through):

1. it reads the ``authorization: Bearer <token>`` call metadata and verifies the token with a
   :class:`~fedcoreml.server.gateway.tokens.TokenStore`; a missing, unknown or revoked
   token ends the call with ``UNAUTHENTICATED``;
2. it charges the call to that device's token bucket (:class:`RateLimiter`); an empty bucket
   ends the call with ``RESOURCE_EXHAUSTED`` and the trailing metadata ``retry-after-ms``;
3. it runs the handler with the device id in a context variable, which
   :func:`authenticated_device_id` returns, so that ``DeviceService`` can refuse a token acting
   for another device (``PERMISSION_DENIED``).

Without the interceptor :func:`authenticated_device_id` is ``None`` and the service behaves as
before (no authentication). Wiring::

    interceptor = DeviceAuthInterceptor(TokenStore(run_dir), RateLimiter(rate_per_s=5, burst=20))
    server, port = start_server(service, address, credentials=creds, interceptors=[interceptor])
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from fedcoreml.ios_bridge.channel import AUTHORIZATION_KEY, RETRY_AFTER_KEY
from fedcoreml.ios_bridge.echo import capped, shown
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.refusal_counts import RefusalCounts
from fedcoreml.server.gateway.refusals import RATE_LIMITED
from fedcoreml.server.gateway.tokens import TokenStore

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_RATE_PER_S",
    "DeviceAuthInterceptor",
    "RateLimiter",
    "authenticated_device_id",
]

log = logging.getLogger("fedcoreml.gateway")

#: A device polls about once a second and downloads or submits a few messages per round.
DEFAULT_RATE_PER_S = 5.0
DEFAULT_BURST = 20
DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name

_device_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fedcoreml_authenticated_device", default=None
)


def authenticated_device_id() -> str | None:
    """The device id the current RPC authenticated as; None when authentication is off."""
    return _device_id.get()


class RateLimiter:
    """Token buckets, one per key: ``burst`` calls at once, refilled at ``rate_per_s``.

    :meth:`acquire` takes one call's worth from ``key``'s bucket and returns 0.0, or, when the
    bucket is empty, takes nothing and returns the seconds until it can. Thread-safe.
    """

    _PRUNE_ABOVE = 10_000  # buckets; beyond this, full (idle) ones are forgotten

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, as of time)

    def acquire(self, key: str) -> float:
        with self._lock:
            now = self._clock()
            tokens = self._level(key, now)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s

    def _level(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (float(self.burst), now))
        if len(self._buckets) > self._PRUNE_ABOVE:
            self._prune(now)
        return min(float(self.burst), tokens + (now - since) * self.rate_per_s)

    def _prune(self, now: float) -> None:
        self._buckets = {
            key: (tokens, since)
            for key, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * self.rate_per_s < self.burst
        }


class DeviceAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates (and optionally rate-limits) every ``DeviceService`` call; see the module."""

    def __init__(
        self,
        tokens: TokenStore,
        rate_limiter: RateLimiter | None = None,
        refusal_counts: RefusalCounts | None = None,
    ) -> None:
        self.tokens = tokens
        self.rate_limiter = rate_limiter
        self.refusal_counts = refusal_counts
        self._prefix = f"/{DEVICE_SERVICE}/"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        rpc = method[len(self._prefix) :]
        return _wrap_handler(handler, functools.partial(self._admit, rpc, metadata))

    def _admit(self, rpc: str, metadata: Sequence[Any], context: grpc.ServicerContext) -> str:
        """The caller's device id, or abort the call (unauthenticated or over its rate)."""
        try:
            device_id = self.tokens.verify(_bearer_token(metadata))
            if self.rate_limiter is not None:
                wait_s = self.rate_limiter.acquire(device_id)
                if wait_s > 0:
                    retry_ms = max(1, math.ceil(wait_s * 1000))
                    context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_ms)),))
                    raise RATE_LIMITED.error(
                        rate=f"{self.rate_limiter.rate_per_s:g}",
                        burst=self.rate_limiter.burst,
                        retry_ms=retry_ms,
                    )
        except GatewayError as exc:
            details = capped(str(exc))  # one line, well under gRPC's metadata limit
            if self.refusal_counts is not None:
                self.refusal_counts.add(exc.key)
            log.info(
                "%s refused (%s %s) for %s: %s",
                rpc, exc.code, exc.key, shown(context.peer()), details,
            )  # fmt: skip
            context.abort(getattr(grpc.StatusCode, exc.code), details)
        return device_id


def _bearer_token(metadata: Sequence[Any]) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry, or None.

    The key and the scheme are matched case-insensitively; whitespace around the value and
    between scheme and token is ignored. protos/README.md documents these forms.
    """
    for key, value in metadata:
        if key.lower() != AUTHORIZATION_KEY or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _wrap_handler(
    handler: grpc.RpcMethodHandler, admit: Callable[[grpc.ServicerContext], str]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run after ``admit``, with the device id in context."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, admit),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, admit),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, admit),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, admit),
        handler.request_deserializer,
        handler.response_serializer,
    )


Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def _unary(behaviour: Behaviour, admit: Callable[[grpc.ServicerContext], str]) -> Behaviour:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        device_id = admit(context)
        scope = contextvars.copy_context()
        scope.run(_device_id.set, device_id)
        return scope.run(behaviour, request, context)

    return run


def _streaming(behaviour: Behaviour, admit: Callable[[grpc.ServicerContext], str]) -> Behaviour:
    # A response stream's body runs each time gRPC asks for the next message, so every step
    # runs in the same private context that holds the device id.
    def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        device_id = admit(context)
        scope = contextvars.copy_context()
        scope.run(_device_id.set, device_id)
        responses = scope.run(behaviour, request, context)
        try:
            while True:
                try:
                    message = scope.run(next, responses)
                except StopIteration:
                    return
                yield message
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                scope.run(close)

    return run
