"""The dashboard's door: a token beyond loopback, loopback host names on loopback, safe headers.

:class:`DashboardGuard` is plain ASGI middleware (it never buffers a response, so event streams
pass through untouched) in front of every route:

* bound beyond loopback it admits a request only with an active dashboard token of the run
  (``fedcoreml tokens create --dashboard``): ``?token=...`` in the URL (a page load is then
  redirected without it, the token kept in an HttpOnly, SameSite=Strict cookie), the cookie, or
  ``Authorization: Bearer ...``. Anything else is answered 401; device tokens do not count.
* bound to loopback it needs no token, but answers only requests whose ``Host`` is a loopback
  name: a web page elsewhere cannot reach it by pointing its own host name at 127.0.0.1.
* every response carries a Content-Security-Policy that allows only the dashboard's own files,
  and ``Referrer-Policy: no-referrer`` (a token in the URL never leaks to another site).
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedcoreml.server.dashboard.address import LOOPBACK_NAMES
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.tokens import DASHBOARD, TokenStore

__all__ = ["COOKIE", "SECURITY_HEADERS", "DashboardGuard"]

COOKIE = "fedcoreml_dashboard"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class DashboardGuard:
    """See the module. ``tokens``: the run's store when a token is required, else None."""

    def __init__(
        self, app: ASGIApp, tokens: TokenStore | None, loopback_only: bool, https: bool = False
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.loopback_only = loopback_only
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None and self.tokens is not None:
            refusal = self._admit(request)
        if refusal is not None:
            await refusal(scope, receive, _with_headers(send))
            return
        await self.app(scope, receive, _with_headers(send))

    def _refusal(self, request: Request) -> Response | None:
        if self.loopback_only and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return PlainTextResponse(
                "this dashboard listens on loopback only: open it as http://127.0.0.1:PORT/ "
                "or http://localhost:PORT/ on the coordinator's machine",
                status_code=403,
            )
        return None

    def _admit(self, request: Request) -> Response | None:
        """None to let the request through, or the response that refuses or redirects it."""
        assert self.tokens is not None
        in_url = request.query_params.get("token")
        token = in_url or _bearer(request) or request.cookies.get(COOKIE)
        try:
            self.tokens.verify(token, kind=DASHBOARD)
        except GatewayError as exc:
            if exc.code == "UNAVAILABLE":  # tokens.json unreadable: nobody gets in
                return PlainTextResponse(str(exc), status_code=503)
            return PlainTextResponse(
                "this dashboard needs a dashboard token: open it with ?token=TOKEN (issue one "
                "with `fedcoreml tokens create --run-dir RUN_DIR --dashboard`)",
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="fedcoreml dashboard"'},
            )
        if in_url is None or request.method not in ("GET", "HEAD"):
            return None
        # A page opened with ?token=: keep the token in a cookie, take it out of the address bar.
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, in_url, httponly=True, samesite="strict", secure=self.https, path="/"
        )
        return response


def _with_headers(send: Send) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for key, value in SECURITY_HEADERS.items():
                headers.setdefault(key, value)
        await send(message)

    return sender


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _host_name(host_header: str) -> str:
    """A Host header's host name: ``[::1]:8080`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host
