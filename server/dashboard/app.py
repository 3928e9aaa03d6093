"""The dashboard's web app: four pages (one HTML shell), a JSON API, server-sent events.

Routes (all read-only but the prediction, which computes and stores nothing)::

    /run /fleet /models /try     the pages (the same shell; static/dashboard.js draws each)
    /static/...                  the page's own scripts and styles, shipped in the package
    /api/events                  server-sent events: run, rounds, fleet (see hub.py)
    /api/run                     the run: configuration, phase, models, rounds
    /api/fleet                   the fleet, with the devices listed
    /api/models/{version}        a model's `model inspect` summary, and if it takes a digit
    /api/predict/{version}       POST a PNG: the model's prediction, and the 28x28 it saw
    /models/{version}.mlmodel    the committed model's exact bytes (version: a round, final)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedcoreml.ios_bridge.predict import ImageInputError, NotADigitModelError
from fedcoreml.server.dashboard.fleet import FleetSource, fleet_snapshot
from fedcoreml.server.dashboard.guard import DashboardGuard
from fedcoreml.server.dashboard.hub import Hub, event_stream
from fedcoreml.server.dashboard.models import ModelLookupError, ModelShelf
from fedcoreml.server.gateway.tokens import TokenStore
from fedcoreml.server.run_dir import RunDirectoryError

__all__ = ["MAX_IMAGE_BYTES", "PAGES", "build_app"]

PAGES = ("run", "fleet", "models", "try")
#: The largest drawing accepted (a 280x280 canvas as PNG is a few KB).
MAX_IMAGE_BYTES = 1024 * 1024
_STATIC = resources.files("fedcoreml.server.dashboard") / "static"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# What a model request may fail with, and the status each is answered with.
_MODEL_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (ModelLookupError, 404),  # no such version
    (RunDirectoryError, 500),  # the file differs from its commit
    (NotADigitModelError, 422),
    (ImageInputError, 400),
)


async def _in_thread(work: Callable[[], Any]) -> tuple[Any, JSONResponse | None]:
    """``work()`` off the event loop: (its result, None), or (None, the error's answer)."""
    try:
        return await anyio.to_thread.run_sync(work), None
    except tuple(kind for kind, _ in _MODEL_ERRORS) as exc:
        status = next(code for kind, code in _MODEL_ERRORS if isinstance(exc, kind))
        return None, _error(status, str(exc))


def build_app(
    hub: Hub,
    shelf: ModelShelf,
    fleet: FleetSource | None,
    tokens: TokenStore | None,
    loopback_only: bool,
    https: bool = False,
) -> Starlette:
    """The app; ``tokens``: require a dashboard token (bound beyond loopback), else None."""
    shell = (_STATIC / "index.html").read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(shell, headers={"cache-control": "no-store"})

    async def home(request: Request) -> Response:
        return RedirectResponse("/run", status_code=307)

    async def run(request: Request) -> Response:
        snapshot = hub.snapshot
        body = f'{{"run": {snapshot.run}, "rounds": [{",".join(snapshot.rounds)}]}}'
        return Response(body, media_type="application/json")

    async def fleet_view(request: Request) -> Response:
        if fleet is None:
            return _error(404, "no live coordinator behind this dashboard")
        return JSONResponse(await anyio.to_thread.run_sync(fleet_snapshot, fleet))

    async def events(request: Request) -> Response:
        return StreamingResponse(
            event_stream(hub),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def model_summary(request: Request) -> Response:
        version = request.path_params["version"]

        summary, failed = await _in_thread(lambda: shelf.summary(shelf.load(version)))
        return failed or JSONResponse(summary)

    async def download(request: Request) -> Response:
        model, failed = await _in_thread(lambda: shelf.load(request.path_params["version"]))
        if failed is not None:
            return failed
        return Response(
            model.data,
            media_type="application/octet-stream",
            headers={
                "content-disposition": f'attachment; filename="{model.filename}"',
                "x-model-sha256": model.sha256,
            },
        )

    async def predict(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
            return _error(413, f"the image is larger than {MAX_IMAGE_BYTES:,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_IMAGE_BYTES:
                return _error(413, f"the image is larger than {MAX_IMAGE_BYTES:,} bytes")
        version = request.path_params["version"]

        def work() -> dict[str, Any]:
            model = shelf.load(version)
            prediction = shelf.predict(model, bytes(body))
            return {"version": model.version, "sha256": model.sha256, **prediction.to_json()}

        answer, failed = await _in_thread(work)
        return failed or JSONResponse(answer)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hub.run)
            yield
            hub.close()
            tasks.cancel_scope.cancel()

    routes = [
        Route("/", home),
        *(Route(f"/{name}", page) for name in PAGES),
        Route("/api/run", run),
        Route("/api/fleet", fleet_view),
        Route("/api/events", events),
        Route("/api/models/{version}", model_summary),
        Route("/api/predict/{version}", predict, methods=["POST"]),
        Route("/models/{version}.mlmodel", download),
        Mount("/static", app=StaticFiles(directory=str(_STATIC)), name="static"),
    ]
    guard = Middleware(DashboardGuard, tokens=tokens, loopback_only=loopback_only, https=https)
    return Starlette(routes=routes, middleware=[guard], lifespan=lifespan)
