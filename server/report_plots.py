"""The run report's plots, drawn with matplotlib (the ``report`` extra), as SVG text and PNG.

Each plot is one figure of a :class:`~fedcoreml.server.run_view.RunView`: test accuracy, test
loss, devices per round and time per round. matplotlib is imported by :func:`draw_plots` only,
with its non-interactive Agg backend, so importing this module costs nothing and never opens a
window.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedcoreml.ios_bridge.extras import require_extra
from fedcoreml.server.run_view import MetricsLine, RunView

__all__ = ["REPORT_EXTRA", "Plot", "draw_plots"]

REPORT_EXTRA = "report"
_WIDTH_IN, _HEIGHT_IN, _DPI = 6.4, 3.4, 110
_COLOURS = {"accent": "#1f6feb", "second": "#d29922", "bad": "#cf222e", "good": "#2da44e"}


@dataclass(frozen=True)
class Plot:
    """One drawn plot: ``name`` (a file stem such as ``accuracy``), its title, SVG and PNG."""

    name: str
    title: str
    svg: str
    png: bytes


def draw_plots(view: RunView) -> list[Plot]:
    """Every plot the run's judged rounds allow (none before round 0 is judged)."""
    require_extra(REPORT_EXTRA, ("matplotlib",))
    import matplotlib

    matplotlib.use("Agg", force=True)
    lines = list(view.metrics)
    if not lines:
        return []
    unit = unit_name(view)
    trained = [line for line in lines if line.round > 0]
    plots = [
        _draw("accuracy", "Test accuracy", unit, lambda ax: _accuracy(ax, lines)),
        _draw("loss", "Test loss", unit, lambda ax: _loss(ax, lines)),
    ]
    if trained:
        plots.append(
            _draw("devices", f"Devices per {unit}", unit, lambda ax: _devices(ax, trained))
        )
        plots.append(_draw("seconds", f"Time per {unit}", unit, lambda ax: _seconds(ax, trained)))
    return plots


def unit_name(view: RunView) -> str:
    """``round``, or ``version`` for a run whose model files are versions (asynchronous runs)."""
    names = [model.path.name for model in view.models]
    return "version" if names and all(n.startswith("version-") for n in names) else "round"


def _draw(name: str, title: str, unit: str, body: Callable[[Any], None]) -> Plot:
    import matplotlib
    import matplotlib.pyplot as plt

    # Clip-path ids derive from this salt: fixed, the same run draws the same SVG.
    matplotlib.rcParams["svg.hashsalt"] = "fedcoreml"
    fig, ax = plt.subplots(figsize=(_WIDTH_IN, _HEIGHT_IN), dpi=_DPI)
    try:
        body(ax)
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        svg, png = io.StringIO(), io.BytesIO()
        fig.savefig(svg, format="svg", metadata={"Date": None})
        fig.savefig(png, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    svg_element = _prefix_ids(_svg_element(svg.getvalue()), f"{name}-")
    return Plot(name=name, title=title, svg=svg_element, png=png.getvalue())


def _svg_element(document: str) -> str:
    """The ``<svg>`` element alone, to embed in HTML (no XML declaration or DOCTYPE)."""
    return document[document.index("<svg") :]


def _prefix_ids(svg: str, prefix: str) -> str:
    """Every id, and every reference to one, prefixed: ids stay unique with several plots on one
    page (each SVG names its figure, axes and glyphs alike)."""
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}\1"', svg)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", svg)


def _series(lines: Sequence[MetricsLine], key: str) -> tuple[list[int], list[float]]:
    points = [(line.round, getattr(line, key)) for line in lines if getattr(line, key) is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _accuracy(ax: Any, lines: Sequence[MetricsLine]) -> None:
    xs, ys = _series(lines, "test_accuracy")
    ax.plot(xs, ys, marker="o", color=_COLOURS["accent"], label="test accuracy (server)")
    xs, ys = _series(lines, "device_accuracy")
    if xs:
        ax.plot(xs, ys, marker="s", color=_COLOURS["second"], label="device accuracy (mean)")
    ax.set_ylim(0, 1)


def _loss(ax: Any, lines: Sequence[MetricsLine]) -> None:
    xs, ys = _series(lines, "test_loss")
    ax.plot(xs, ys, marker="o", color=_COLOURS["accent"], label="test loss (cross-entropy)")


def _devices(ax: Any, lines: Sequence[MetricsLine]) -> None:
    width = 0.27
    for offset, key, colour, label in (
        (-width, "devices_sampled", _COLOURS["accent"], "sampled"),
        (0.0, "devices_reported", _COLOURS["good"], "reported"),
        (width, "devices_failed", _COLOURS["bad"], "failed"),
    ):
        xs, ys = _series(lines, key)
        ax.bar([x + offset for x in xs], ys, width=width, color=colour, label=label)
    ax.yaxis.get_major_locator().set_params(integer=True)


def _seconds(ax: Any, lines: Sequence[MetricsLine]) -> None:
    xs, ys = _series(lines, "seconds")
    ax.bar(xs, ys, color=_COLOURS["accent"], label="seconds")
    ax.set_ylabel("seconds")
