"""``fedcoreml report``: a self-contained HTML page and PNG plots of real run directories."""

from __future__ import annotations

import html
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from real_runs import scripted_run

from fedcoreml.ios_bridge.extras import MissingExtraError
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.server.cli import main
from fedcoreml.server.report import render_report, write_report
from fedcoreml.server.report_plots import draw_plots
from fedcoreml.server.run_dir import RunDirectory
from fedcoreml.server.run_view import MetricsLine, ModelVersion, RunView, read_run

pytest.importorskip("matplotlib", reason="the report extra (matplotlib) is not installed")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return scripted_run(tmp_path_factory.mktemp("report") / "run", rounds=3, devices=2)


def table(page: str, table_id: str) -> list[list[str]]:
    """The cells of one table of the page, header row first, unescaped."""
    body = re.search(rf"<table id='{table_id}'>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", c))
            for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r)
        ]
        for r in rows
    ]


def test_the_report_is_one_self_contained_page_of_the_run(finished, tmp_path):
    files = write_report(finished, tmp_path / "out" / "report.html")
    page = files.html.read_text()
    # self-contained: no script, no stylesheet or image fetched, nothing referenced outside
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!#)""", page)
    assert "url(" not in page.replace("url(#", "")
    for name in ("accuracy", "loss", "devices", "seconds"):
        assert re.search(rf"<figure id='plot-{name}'[^>]*><svg", page), name
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page

    metrics = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    rounds = table(page, "rounds")
    assert rounds[0][:6] == ["round", "test accuracy", "test loss", "sampled", "reported", "failed"]
    assert [row[0] for row in rounds[1:]] == ["0", "1", "2", "3"]
    for row, line in zip(rounds[1:], metrics, strict=True):
        assert row[1] == f"{line['test_accuracy']:.4f}" and row[2] == f"{line['test_loss']:.4f}"
        assert row[3:6] == [str(line[k]) for k in ("devices_sampled", "devices_reported",
                                                   "devices_failed")]  # fmt: skip

    models = table(page, "models")
    assert [row[0] for row in models[1:]] == ["0", "1", "2", "3", "final (= 3)"]
    for row in models[1:]:
        data = (finished / row[1]).read_bytes()
        assert row[2] == sha256_hex(data) and row[3] == f"{len(data):,} B"

    config = dict(table(page, "config")[1:])
    recorded = json.loads((finished / "run.json").read_text())
    assert config["rounds"] == "3" and config["run_id"] == str(recorded["run_id"])
    assert set(config) == set(recorded)
    assert "finished" in page and str(finished.resolve()) in page


def test_png_plots_are_written_to_the_folder(finished, tmp_path):
    files = write_report(finished, tmp_path / "report.html", tmp_path / "plots")
    assert sorted(p.name for p in files.pngs) == [
        "accuracy.png", "devices.png", "loss.png", "seconds.png"
    ]  # fmt: skip
    for path in files.pngs:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
            assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def test_the_same_run_draws_the_same_plots(finished):
    view = read_run(finished)
    first, second = draw_plots(view), draw_plots(view)
    assert [p.svg for p in first] == [p.svg for p in second]
    ids = [re.findall(r'\bid="([^"]+)"', p.svg) for p in first]
    assert all(len(set(i)) == len(i) for i in ids)
    assert not set(ids[0]) & set(ids[1])  # several plots on one page: no id clashes
    for plot, own in zip(first, ids, strict=True):  # and every reference finds its own id
        used = re.findall(r'href="#([^"]+)"', plot.svg) + re.findall(r"url\(#([^)]+)\)", plot.svg)
        assert used and set(used) <= set(own)


def test_a_run_that_only_began_gets_a_report_saying_so(tmp_path):
    RunDirectory(tmp_path / "run").write_config({"run_id": 1, "rounds": 5, "strategy": "fedavg"})
    page = write_report(tmp_path / "run", tmp_path / "report.html").html.read_text()
    assert "running" in page and "No round has been judged yet" in page
    assert "No model committed yet" in page and "<svg" not in page
    assert dict(table(page, "config")[1:])["rounds"] == "5"


def test_a_still_running_run_is_reported_as_far_as_it_went(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "final.mlmodel").unlink()  # as a run that has not ended yet
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(metrics[:2]) + "\n")  # rounds 2, 3 judging
    page = write_report(run_dir, tmp_path / "report.html").html.read_text()
    assert "class='state running'" in page
    assert [row[0] for row in table(page, "rounds")[1:]] == ["0", "1"]
    models = table(page, "models")[1:]
    assert [row[0] for row in models] == ["0", "1", "2", "3"]
    judged = [f"{json.loads(line)['test_accuracy']:.4f}" for line in metrics[:2]]
    assert [row[4] for row in models] == [*judged, "-", "-"]  # committed, not judged yet


def test_whatever_the_run_directory_holds_is_escaped(tmp_path):
    hostile = "<script>alert('x')</script>"
    RunDirectory(tmp_path / "run").write_config({"run_id": 1, "strategy": hostile, hostile: 1})
    page = render_report(read_run(tmp_path / "run"))
    assert "<script" not in page
    assert html.escape(hostile, quote=True) in page


def test_an_async_run_is_reported_by_version(tmp_path):
    models = tuple(
        ModelVersion(v, tmp_path / "models" / f"version-{v:04d}.mlmodel", f"{v:064x}", 10)
        for v in range(3)
    )
    lines = tuple(
        MetricsLine.from_line(
            {
                "round": v,
                "model_sha256": f"{v:064x}",
                "test_accuracy": 0.1 * v,
                "test_loss": 2.0 - v,
                "devices_sampled": 4,
                "devices_reported": 3,
                "devices_failed": 1,
                "seconds": 1.5,
            },
            tmp_path / "metrics.jsonl",
        )
        for v in range(3)
    )
    view = RunView(tmp_path, {"strategy": "fedbuff"}, models, lines, None)
    page = render_report(view)
    assert table(page, "rounds")[0][0] == "version" and table(page, "models")[0][0] == "version"
    assert "Devices per version" in page and "versions committed" in page


def test_the_command_writes_the_report_and_says_where(finished, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(finished), "--out", str(out), "--png", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out} (finished; 4 models committed, 4 judged)" in printed
    assert str(tmp_path / "p" / "accuracy.png") in printed
    assert out.exists() and (tmp_path / "p" / "seconds.png").exists()


def test_the_command_names_a_damaged_run_directory(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    RunDirectory(run_dir).round_model(2).write_bytes(b"bit rot")
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedcoreml report: error: ") and "round-0002.mlmodel: sha256" in error
    assert not (tmp_path / "r.html").exists()


def test_without_the_report_extra_the_command_says_what_to_install(finished, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    with pytest.raises(MissingExtraError, match=r'pip install "fedcoreml\[report\]"'):
        draw_plots(read_run(finished))
