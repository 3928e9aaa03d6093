"""The dashboard's server: uvicorn on a thread of its own in the coordinator's process.

:func:`check_dashboard` refuses an address or a missing token before anything starts;
:class:`Dashboard` binds its socket in the caller's thread (so a port in use is reported at
once, in one line), serves on a daemon thread with its own event loop, and stops with the
coordinator. It never touches the coordinator's locks from the loop: reads run on worker
threads (see hub.py).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from fedcoreml.ios_bridge.errors import FedCoreMLError
from fedcoreml.server.dashboard.address import DashboardAddress, parse_dashboard_address
from fedcoreml.server.dashboard.app import build_app
from fedcoreml.server.dashboard.fleet import FleetSource
from fedcoreml.server.dashboard.hub import Hub
from fedcoreml.server.dashboard.models import ModelShelf
from fedcoreml.server.dashboard.run_feed import RunFeed
from fedcoreml.server.gateway.tokens import DASHBOARD, TokenError, TokenStore

__all__ = ["Dashboard", "DashboardError", "check_dashboard", "start_dashboard"]

log = logging.getLogger("fedcoreml.dashboard")

_START_TIMEOUT_S = 15.0


class DashboardError(FedCoreMLError):
    """The dashboard cannot start: no token beyond loopback, or an address it cannot bind."""


def check_dashboard(listen: str, run_dir: str | Path) -> tuple[DashboardAddress, TokenStore | None]:
    """The parsed address and, beyond loopback, the run's token store (which must hold an
    active dashboard token); raises AddressError or DashboardError saying what is wrong."""
    address = parse_dashboard_address(listen)
    if address.loopback:
        return address, None
    try:
        tokens = TokenStore(run_dir)
    except TokenError as exc:
        raise DashboardError(f"--dashboard {listen}: {exc}") from None
    if not tokens.has_active(DASHBOARD):
        raise DashboardError(
            f"--dashboard {listen} listens beyond loopback and needs a dashboard token; create "
            f"one with `fedcoreml tokens create --run-dir {run_dir} --dashboard` (or listen on "
            "127.0.0.1)"
        )
    return address, tokens


class Dashboard:
    """One dashboard over one run directory (and, with ``fleet``, a live coordinator)."""

    def __init__(
        self,
        listen: str,
        run_dir: str | Path,
        fleet: FleetSource | None = None,
        tls: tuple[Path, Path] | None = None,
        poll_s: float = 0.25,
    ) -> None:
        self.address, tokens = check_dashboard(listen, run_dir)
        self.tls = tls
        feed = RunFeed(run_dir)
        self.hub = Hub(feed, fleet, poll_s=poll_s)
        shelf = ModelShelf(feed.directory, lambda: feed.view)
        self.app = build_app(
            self.hub, shelf, fleet, tokens, loopback_only=self.address.loopback,
            https=tls is not None,
        )  # fmt: skip
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where to open it (a wildcard address is shown as this machine's host name)."""
        host = socket.gethostname() if self.address.wildcard else self.address.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> str:
        """Listen and serve; returns the URL. Raises DashboardError if it cannot bind."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the coordinator's logging as it is
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise DashboardError(
                    f"--dashboard {self.address.text}: the web server did not start"
                )
            time.sleep(0.01)
        self._server, self._thread = server, thread
        log.info("dashboard on %s", self.url)
        return self.url

    def _bind(self) -> socket.socket:
        sock = socket.socket(self.address.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address.sockaddr)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            why = exc.strerror or str(exc)
            raise DashboardError(
                f"--dashboard {self.address.text}: cannot listen ({why})"
            ) from None
        sock.set_inheritable(False)
        return sock

    def stop(self) -> None:
        """End every event stream and stop serving (waits a few seconds at most)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self.hub.close_from_thread()
        server.should_exit = True
        thread.join(timeout=10)


def start_dashboard(coordinator, listen: str) -> Dashboard:
    """A started dashboard over a coordinator's run and fleet (its TLS certificate, if any)."""
    config = coordinator.config
    fleet = FleetSource(
        registry=coordinator.registry,
        board=coordinator.board,
        refusals=coordinator.service.refusal_counts,
        min_devices=config.min_devices,
    )
    tls = (
        (Path(config.tls_cert), Path(config.tls_key))
        if config.tls_cert and config.tls_key
        else None
    )
    dashboard = Dashboard(listen, config.run_dir, fleet, tls)
    dashboard.start()
    return dashboard
