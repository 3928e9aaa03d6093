"""The run report: one self-contained HTML page of a run directory, finished or still running.

:func:`render_report` turns a :class:`~fedcoreml.server.run_view.RunView` into HTML with its plots
inline (SVG), its rounds, its models (sha256, size) and its configuration; the page loads nothing
from anywhere, so it can be mailed or archived as one file. :func:`write_report` writes it, and
the plots as PNG files if asked. Every value read from the run directory is HTML-escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic, write_text_atomic
from fedcoreml.server.report_plots import Plot, draw_plots, unit_name
from fedcoreml.server.run_view import MetricsLine, ModelVersion, RunView, read_run

__all__ = ["ReportFiles", "render_report", "write_report"]

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; font-size: 1.2rem; }
.sub { color: #59636e; margin-top: 0; }
.state { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; font-size: .85rem;
         color: #fff; background: #1f6feb; } .state.finished { background: #2da44e; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { border: 1px solid #d1d9e0; border-radius: .5rem; padding: .5rem .9rem; min-width: 9rem; }
.card b { display: block; font-size: 1.3rem; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(28rem, 1fr)); gap: 1rem; }
.plots figure { margin: 0; } .plots svg { width: 100%; height: auto; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border-bottom: 1px solid #d1d9e0; padding: .25rem .6rem; text-align: right; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
code { font-size: .85rem; word-break: break-all; }
"""


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote: the HTML page and the PNG plots (if asked for)."""

    html: Path
    pngs: tuple[Path, ...]
    view: RunView


def write_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] = "report.html",
    png_dir: str | os.PathLike[str] | None = None,
) -> ReportFiles:
    """Read ``run_dir``, write its HTML report to ``out`` and, with ``png_dir``, its plots there."""
    view = read_run(run_dir)
    plots = draw_plots(view)
    page = write_text_atomic(Path(out), render_report(view, plots))
    pngs: list[Path] = []
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        pngs = [write_bytes_atomic(folder / f"{plot.name}.png", plot.png) for plot in plots]
    return ReportFiles(html=page, pngs=tuple(pngs), view=view)


def render_report(view: RunView, plots: Sequence[Plot] | None = None) -> str:
    """The report page of ``view`` (``plots``: as :func:`draw_plots` draws them, by default)."""
    plots = draw_plots(view) if plots is None else plots
    unit = unit_name(view)
    read_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        f"<h1>fedcoreml run report</h1>\n<p class=sub><code>{_e(view.path.resolve())}</code> "
        f"<span class='state {view.state}'>{view.state}</span> · read {read_at}</p>",
        _summary(view, unit),
        _plots(plots),
        _rounds(view.metrics, unit),
        _models(view, unit),
        _config(view.config),
    ]
    body = "\n".join(sections)
    title = f"fedcoreml report: {view.path.name}"
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        "<meta name=viewport content='width=device-width, initial-scale=1'>\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _summary(view: RunView, unit: str) -> str:
    judged = [line for line in view.metrics if line.test_accuracy is not None]
    planned = view.config.get("rounds")
    committed = view.models[-1].version if view.models else None
    cards = [
        (f"{unit}s committed", _progress(committed, planned)),
        ("state", view.state),
    ]
    if judged:
        last = judged[-1]
        best = max(judged, key=lambda line: line.test_accuracy or 0.0)
        cards += [
            (f"test accuracy ({unit} {last.round})", f"{last.test_accuracy:.4f}"),
            (f"best ({unit} {best.round})", f"{best.test_accuracy:.4f}"),
        ]
    trained = [line for line in view.metrics if line.round > 0]
    if trained:
        seconds = sum(line.seconds or 0.0 for line in trained)
        examples = sum(line.examples or 0 for line in trained)
        cards += [("examples trained on", f"{examples:,}"), ("time in rounds", f"{seconds:.1f} s")]
    strategy = view.config.get("strategy")
    if strategy:
        cards.append(("strategy", str(strategy)))
    items = "".join(
        f"<div class=card>{_e(label)}<b>{_e(value)}</b></div>" for label, value in cards
    )
    return f"<div class=cards>{items}</div>"


def _progress(committed: int | None, planned: Any) -> str:
    done = "none" if committed is None else str(committed)
    return f"{done} of {planned}" if isinstance(planned, int) else done


def _plots(plots: Sequence[Plot]) -> str:
    if not plots:
        return "<h2>Plots</h2>\n<p>No round has been judged yet: nothing to plot.</p>"
    figures = "\n".join(
        f"<figure id='plot-{_e(p.name)}' aria-label='{_e(p.title)}'>{p.svg}</figure>" for p in plots
    )
    return f"<h2>Plots</h2>\n<div class=plots>\n{figures}\n</div>"


def _rounds(lines: Sequence[MetricsLine], unit: str) -> str:
    if not lines:
        return f"<h2>{unit.capitalize()}s</h2>\n<p>No {unit} judged yet.</p>"
    header = [unit, "test accuracy", "test loss", "sampled", "reported", "failed", "examples",
              "seconds", "device accuracy", "abandoned attempts"]  # fmt: skip
    rows = [
        [
            line.round,
            _fixed(line.test_accuracy, 4),
            _fixed(line.test_loss, 4),
            line.devices_sampled,
            line.devices_reported,
            line.devices_failed,
            None if line.examples is None else f"{line.examples:,}",
            _fixed(line.seconds, 2),
            _fixed(line.device_accuracy, 4),
            line.abandoned_attempts,
        ]
        for line in lines
    ]
    return f"<h2>{unit.capitalize()}s</h2>\n" + _table(header, rows, table_id="rounds")


def _models(view: RunView, unit: str) -> str:
    if not view.models:
        return "<h2>Models</h2>\n<p>No model committed yet.</p>"
    header = [unit, "file", "sha256", "size", "test accuracy"]
    rows = [_model_row(view, model, str(model.version)) for model in view.models]
    if view.final_model is not None:
        rows.append(_model_row(view, view.final_model, f"final (= {view.final_model.version})"))
    return "<h2>Models</h2>\n" + _table(header, rows, left={1, 2}, table_id="models")


def _model_row(view: RunView, model: ModelVersion, label: str) -> list[Any]:
    judged = view.metrics_for(model.version)
    accuracy = None if judged is None else _fixed(judged.test_accuracy, 4)
    relative = (
        model.path.relative_to(view.path) if model.path.is_relative_to(view.path) else model.path
    )
    return [label, relative, _Code(model.sha256), f"{model.size_bytes:,} B", accuracy]


def _config(config: Any) -> str:
    rows = [[key, _config_value(config[key])] for key in sorted(config)]
    return "<h2>Configuration (run.json)</h2>\n" + _table(
        ["option", "value"], rows, left={0, 1}, table_id="config"
    )


def _config_value(value: Any) -> str:
    """A value as run.json spells it (true, null, {...}); a string as it is."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class _Code:
    text: str


def _table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    left: set[int] | None = None,
    table_id: str = "",
) -> str:
    left = left or set()

    def cell(tag: str, index: int, value: Any) -> str:
        css = " class=l" if index in left else ""
        if isinstance(value, _Code):
            return f"<{tag}{css}><code>{_e(value.text)}</code></{tag}>"
        return f"<{tag}{css}>{'-' if value is None else _e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table id='{table_id}'>\n<tr>{head}</tr>\n{body}\n</table>"


def _fixed(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
