"""A real headless browser for tests: Debian's ``chromium`` driven over the DevTools protocol.

No Selenium, no Playwright, nothing downloaded: the system's chromium is started with
``--headless --no-sandbox --disable-gpu --disable-background-networking`` and a fresh
``--user-data-dir``, on a DevTools port it picks itself (read back from the profile's
``DevToolsActivePort``), and one page is driven over a websocket with plain DevTools commands:
navigate, evaluate JavaScript, dispatch real mouse input, take screenshots.

    with Browser.launch(tmp_path) as browser:
        browser.navigate("http://127.0.0.1:8080/run")
        browser.wait_for("document.querySelector('#plot-accuracy').dataset.points >= 2")
        browser.screenshot(tmp_path / "run.png")

``python tests/browser.py URL OUT_DIR`` saves a screenshot of each dashboard page at URL.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["Browser", "BrowserError", "chromium_path"]

_START_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """The browser did not start, or a DevTools command or page script failed."""


def chromium_path() -> str | None:
    """The system's chromium, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless chromium and one page in it; use :meth:`launch` as a context manager."""

    def __init__(self, process: subprocess.Popen, profile: Path, socket: ClientConnection) -> None:
        self.process = process
        self.profile = profile
        self._socket = socket
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    @classmethod
    def launch(cls, workdir: Path, width: int = 1280, height: int = 900) -> Browser:
        executable = chromium_path()
        if executable is None:
            raise BrowserError("chromium is not installed (apt-get install chromium)")
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir))
        process = subprocess.Popen(
            [
                executable, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", f"--user-data-dir={profile}",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-dev-shm-usage", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = _devtools_port(profile, process)
            socket = connect(_page_socket_url(port), max_size=64 * 1024 * 1024, open_timeout=10)
        except BaseException:
            process.kill()
            process.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(process, profile, socket)
        browser.send("Page.enable")
        browser.send("Runtime.enable")
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- DevTools ------------------------------------------------------------------------------

    def send(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result (events on the way are kept)."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer within {timeout_s} s")
            message = json.loads(self._socket.recv(timeout=remaining))
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate", timeout_s=timeout_s, expression=expression,
            returnByValue=True, awaitPromise=True,
        )  # fmt: skip
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} raised: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0, poll_s: float = 0.1) -> Any:
        """Evaluate ``expression`` until it is truthy; its value. BrowserError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout_s} s: {expression}")
            time.sleep(poll_s)

    def navigate(self, url: str, timeout_s: float = 30.0) -> None:
        """Open ``url`` and wait until it has loaded (its scripts included)."""
        self.events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout_s)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the window)."""
        metrics = self.send("Page.getLayoutMetrics")["cssContentSize"]
        data = self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"],
                  "scale": 1},
        )["data"]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def drag(self, points: Iterable[tuple[float, float]], pointer: str = "mouse") -> None:
        """Press at the first point, move through the others, release: real input events
        (the page sees pointerdown, pointermove and pointerup as from a mouse)."""
        points = list(points)
        first, *rest = points
        self._mouse("mousePressed", first)
        for point in rest:
            self._mouse("mouseMoved", point)
        self._mouse("mouseReleased", points[-1])

    def _mouse(self, kind: str, point: tuple[float, float]) -> None:
        self.send(
            "Input.dispatchMouseEvent", type=kind, x=point[0], y=point[1], button="left",
            buttons=0 if kind == "mouseReleased" else 1, clickCount=1,
        )  # fmt: skip


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    """The port chromium chose, as it writes it to ``DevToolsActivePort`` in its profile."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserError(f"chromium exited with status {process.returncode} at start")
        try:
            first = marker.read_text().splitlines()[0]
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            time.sleep(0.05)
    raise BrowserError(f"chromium did not open its DevTools port within {_START_TIMEOUT_S} s")


def _page_socket_url(port: int) -> str:
    """The DevTools websocket of the browser's one page (about:blank)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
            targets = json.loads(reply.read())
        pages = [t for t in targets if t.get("type") == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.05)
    raise BrowserError("chromium opened no page")


def _save_pages(url: str, out_dir: Path) -> None:
    base = url.rstrip("/")
    with Browser.launch(out_dir) as browser:
        for page in ("run", "fleet", "models", "try"):
            browser.navigate(f"{base}/{page}")
            time.sleep(1.5)  # live data arrives over the event stream
            print(browser.screenshot(out_dir / f"dashboard-{page}.png"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/browser.py DASHBOARD_URL OUT_DIR")
    _save_pages(sys.argv[1], Path(sys.argv[2]))
