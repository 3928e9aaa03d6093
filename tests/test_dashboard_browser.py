"""The dashboard in a real browser: Debian's headless chromium, driven over DevTools.

A live run (a real coordinator on 127.0.0.1, scripted devices over gRPC, rounds paced so a page
can watch them): the Run page's accuracy plot gains a point after a round without a reload; the
Fleet page lists the devices; the Models page summarises a model. A digit drawn on the Try it
page with real mouse input is classified as the reference interpreter classifies the 28x28 the
page shows. Bound beyond loopback (this machine's own private address), a request without the
dashboard token is refused. Each page is saved as a screenshot, in the folder printed at the
start (``FEDCOREML_SCREENSHOTS=DIR`` chooses it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from browser import Browser, chromium_path
from protocol_devices import ScriptedDevice, start_devices

from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
from fedcoreml.server.dashboard import Dashboard, start_dashboard
from fedcoreml.server.dashboard.fleet import SHOWN_ID_CHARS
from fedcoreml.server.gateway.tokens import DASHBOARD, TokenStore
from fedcoreml.server.run_dir import RunDirectory

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed")

ROUNDS = 4
DEVICES = 3
PACE_S = 0.6  # each scripted device waits this long before it submits: a round takes ~0.7 s


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory, request) -> Path:
    chosen = os.environ.get("FEDCOREML_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("dashboard-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even while output is captured
            reporter.write_line(f"dashboard screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    with Browser.launch(tmp_path_factory.mktemp("chromium")) as browser:
        yield browser


@dataclass
class LiveRun:
    """A coordinator running in a thread, its dashboard, and scripted devices started on cue."""

    coordinator: Coordinator
    url: str
    thread: threading.Thread
    stop: threading.Event | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    devices: list[ScriptedDevice] = field(default_factory=list)

    @property
    def run_dir(self) -> RunDirectory:
        return RunDirectory(self.coordinator.config.run_dir)

    def start_devices(self) -> None:
        if self.stop is not None:
            return
        port = self.coordinator.port
        self.devices = [
            ScriptedDevice(f"127.0.0.1:{port}", f"iphone-{i:02d}-7D3F0C2A", 200 * (i + 1),
                           0.0, delay_s=PACE_S, noise=0.01)
            for i in range(DEVICES)
        ]  # fmt: skip
        self.stop, self.threads = start_devices(self.devices)

    def finish(self) -> None:
        """Let the run end (starting the devices if no test did)."""
        self.start_devices()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the run did not finish"
        assert self.run_dir.final_model.exists()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveRun]:
    config = CoordinatorConfig(
        run_dir=tmp_path_factory.mktemp("live") / "run", rounds=ROUNDS, min_devices=DEVICES,
        listen="127.0.0.1:0", round_timeout=60, session_ttl=5, poll_interval_ms=50,
    )  # fmt: skip
    coordinator = Coordinator(config)
    coordinator.start()
    dashboard = start_dashboard(coordinator, "127.0.0.1:0")
    thread = threading.Thread(target=coordinator.run, name="live-run", daemon=True)
    thread.start()
    run = LiveRun(coordinator, dashboard.url, thread)
    try:
        yield run
    finally:
        if run.stop is not None:
            run.stop.set()
            for device_thread in run.threads:
                device_thread.join(timeout=30)
        thread.join(timeout=10)  # a failed test may leave the run waiting: it is a daemon
        coordinator.stop()
        dashboard.stop()


ACCURACY_POINTS = "[...document.querySelectorAll('#plot-accuracy circle.point')]"


def plotted(browser: Browser) -> list[tuple[int, float]]:
    return [
        (int(x), float(y))
        for x, y in browser.evaluate(f"{ACCURACY_POINTS}.map(c => [c.dataset.x, c.dataset.y])")
    ]


def test_during_a_live_run_the_accuracy_plot_gains_a_point_after_a_round(
    live, browser, screenshots
):
    browser.navigate(live.url + "run")
    browser.wait_for("document.getElementById('connection').dataset.state === 'live'")
    browser.wait_for(f"{ACCURACY_POINTS}.length === 1")  # round 0: the initial model, judged
    state = browser.wait_for(
        "(t => t.startsWith('waiting for devices') && t)"
        "(document.getElementById('run-state').textContent)"
    )
    assert state == f"waiting for devices (0 of {DEVICES})"
    browser.evaluate("window.stillTheSamePage = true")

    live.start_devices()
    browser.wait_for(f"{ACCURACY_POINTS}.length >= 2", timeout_s=60)
    assert browser.evaluate("window.stillTheSamePage === true"), "the page was reloaded"
    judged = [(line["round"], line["test_accuracy"]) for line in live.run_dir.read_metrics()]
    points = plotted(browser)
    assert points == judged[: len(points)]  # what the page plots is what the run judged
    assert [x for x, _ in points][:2] == [0, 1]

    browser.navigate(live.url + "fleet")
    browser.wait_for(f"document.getElementById('fleet-registered').textContent === '{DEVICES}'")
    rows = browser.wait_for(
        f"(r => r.length === {DEVICES} && r)([...document.querySelectorAll('#fleet-devices "
        "tbody tr')].map(tr => tr.cells[0].textContent))"
    )
    ids = [device.device_id for device in live.devices]
    assert sorted(rows) == [device_id[:SHOWN_ID_CHARS] + "…" for device_id in ids]  # cut short
    browser.screenshot(screenshots / "dashboard-fleet.png")

    live.finish()
    browser.navigate(live.url + "run")
    browser.wait_for(f"{ACCURACY_POINTS}.length === {ROUNDS + 1}", timeout_s=30)
    browser.wait_for("document.getElementById('run-state').textContent === 'finished'")
    assert plotted(browser) == [
        (line["round"], line["test_accuracy"]) for line in live.run_dir.read_metrics()
    ]
    devices_plot = "document.getElementById('plot-devices').dataset.points"
    assert browser.evaluate(devices_plot) == str(ROUNDS)
    browser.screenshot(screenshots / "dashboard-run.png")

    browser.navigate(live.url + "models")
    browser.wait_for("document.getElementById('model-summary').dataset.version === 'final'")
    rows = browser.evaluate("document.querySelectorAll('#models-table tbody tr').length")
    assert rows == ROUNDS + 2  # rounds 0..ROUNDS and the final model
    browser.screenshot(screenshots / "dashboard-models.png")


def canvas_point(browser: Browser, x: float, y: float) -> tuple[float, float]:
    box = json.loads(browser.evaluate(
        "JSON.stringify(document.getElementById('try-canvas').getBoundingClientRect())"
    ))  # fmt: skip
    return box["x"] + x * box["width"] / 280, box["y"] + y * box["height"] / 280


def draw_seven(browser: Browser) -> None:
    """A 7 in canvas coordinates: a bar across the top, then a stroke down to the left."""
    top = [(70 + 10 * i, 60) for i in range(15)]
    down = [(210 - 5 * i, 60 + 10 * i) for i in range(1, 18)]
    browser.drag([canvas_point(browser, x, y) for x, y in top + down])


def page_prediction(browser: Browser, after: int) -> dict:
    browser.wait_for(
        f"Number(document.getElementById('try-label').dataset.predictions || 0) > {after}"
    )
    return browser.evaluate(
        "(() => { const l = document.getElementById('try-label').dataset;"
        " return {label: l.label, version: l.version, probabilities: JSON.parse(l.probabilities),"
        " image: JSON.parse(document.getElementById('try-input').dataset.image),"
        " pixels: [...document.getElementById('try-input').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data].filter((_, i) => i % 4 === 0)}; })()"
    )


def interpreter_says(model: bytes, image: list[list[float]]) -> tuple[str, np.ndarray]:
    x = np.array(image, dtype=np.float32).reshape(1, 1, 28, 28)
    probabilities = ReferenceInterpreter(spec_from_bytes(model)).predict(x, ["output"])["output"]
    probabilities = probabilities.reshape(-1)
    return str(int(np.argmax(probabilities))), probabilities


def test_a_drawn_digit_gets_the_class_the_reference_interpreter_gives(live, browser, screenshots):
    live.finish()
    browser.navigate(live.url + "try")
    browser.wait_for("document.getElementById('try-version').value === 'final'")
    browser.wait_for("!document.getElementById('try-canvas').classList.contains('disabled')")
    draw_seven(browser)
    shown = page_prediction(browser, after=0)
    assert shown["version"] == "final"
    image = np.array(shown["image"])
    assert image.shape == (28, 28) and image.max() > 0.5  # the stroke reached the model
    label, probabilities = interpreter_says(live.run_dir.final_model.read_bytes(), shown["image"])
    assert shown["label"] == label
    page = np.array([shown["probabilities"][str(i)] for i in range(10)])
    np.testing.assert_allclose(page, probabilities, atol=1e-5)
    # the 28x28 drawn beside the canvas is that input, pixel for pixel
    np.testing.assert_array_equal(np.array(shown["pixels"]).reshape(28, 28),
                                  np.round(image * 255))  # fmt: skip
    browser.screenshot(screenshots / "dashboard-try.png")

    browser.evaluate(
        "(s => { s.value = '1'; s.dispatchEvent(new Event('change')); })"
        "(document.getElementById('try-version'))"
    )
    again = page_prediction(browser, after=1)
    assert again["version"] == "1" and again["image"] == shown["image"]
    round_one = live.run_dir.round_model(1).read_bytes()
    label, probabilities = interpreter_says(round_one, again["image"])
    assert again["label"] == label
    page = np.array([again["probabilities"][str(i)] for i in range(10)])
    np.testing.assert_allclose(page, probabilities, atol=1e-5)


def private_address() -> str | None:
    """This machine's own private (non-loopback) IPv4 address, or None; no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    ip = ipaddress.ip_address(address)
    return address if ip.is_private and not ip.is_loopback and not ip.is_unspecified else None


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_beyond_loopback_a_request_without_the_dashboard_token_is_refused(
    live, browser, screenshots
):
    address = private_address()
    if address is None:
        pytest.skip("this machine has no private non-loopback address to bind")
    live.finish()
    store = TokenStore(live.run_dir.path)
    secret = store.create("ops", kind=DASHBOARD)
    dashboard = Dashboard(f"{address}:0", live.run_dir.path)
    url = dashboard.start()
    try:
        assert not dashboard.address.loopback
        assert status_of(url + "api/run") == 401
        browser.navigate(url + "run")
        assert "needs a dashboard token" in browser.evaluate("document.body.innerText")
        browser.screenshot(screenshots / "dashboard-refused.png")

        browser.navigate(f"{url}run?token={secret}")
        assert browser.evaluate("location.pathname + location.search") == "/run"
        browser.wait_for("document.getElementById('connection').dataset.state === 'live'")
        browser.wait_for(f"{ACCURACY_POINTS}.length === {ROUNDS + 1}")
        assert browser.evaluate("fetch('/api/run').then(r => r.status)") == 200
        store.revoke("ops")
        assert browser.evaluate("fetch('/api/run').then(r => r.status)") == 401
    finally:
        dashboard.stop()


def test_the_run_report_renders_self_contained(live, browser, screenshots, tmp_path):
    """`fedcoreml report` of the finished run, opened from disk: every plot drawn, one table row
    per judged round, and not one resource fetched from anywhere."""
    pytest.importorskip("matplotlib", reason="the report's plots need fedcoreml[report]")
    live.finish()
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "fedcoreml.server.cli", "report", str(live.run_dir.path),
         "--out", str(report)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    browser.navigate(report.as_uri())
    sizes = browser.evaluate(
        "[...document.querySelectorAll('figure svg')].map(s => {"
        " const r = s.getBoundingClientRect(); return [r.width, r.height]; })"
    )
    assert len(sizes) == 4 and all(w > 200 and h > 100 for w, h in sizes)  # 4 plots, drawn
    rows = browser.evaluate("document.querySelectorAll('#rounds tr:has(td)').length")
    assert rows == len(live.run_dir.read_metrics()) == ROUNDS + 1
    assert browser.evaluate("performance.getEntriesByType('resource').length") == 0
    browser.screenshot(screenshots / "report.png")
