"""The coordinator's read-only web dashboard: ``fedcoreml server --dashboard HOST:PORT``.

Four pages, served from the coordinator's process on a thread of their own: **Run** (the
configuration, the phase, test accuracy and loss per round as live plots, devices sampled /
reported / failed and time per round), **Fleet** (devices registered, connected, training, idle;
refusals by reason; last seen per device), **Models** (each round's ``.mlmodel`` to download,
its sha256, size and ``model inspect`` summary) and **Try it** (draw a digit; the prediction of
any round's model by the reference interpreter on its exact bytes). Everything the pages load
ships in this package (``static/``): no CDN, nothing from the internet.

Modules: ``address`` (where it listens; loopback or not), ``guard`` (token and Host checks),
``run_feed`` and ``fleet`` (read-only snapshots of the run directory and the live fleet),
``hub`` (one reader fanned out to every page's event stream), ``models`` (a committed model's
bytes, summary, predictions), ``app`` (the routes), ``serve`` (uvicorn on its thread).
"""

from fedcoreml.server.dashboard.serve import (
    Dashboard,
    DashboardError,
    check_dashboard,
    start_dashboard,
)

__all__ = ["Dashboard", "DashboardError", "check_dashboard", "start_dashboard"]
