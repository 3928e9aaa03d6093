"""The dashboard's door: dashboard tokens (a kind of their own), the refusal to start beyond
loopback without one, and the guard that answers 401 / 403 in front of every route."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedcoreml.server.cli import main
from fedcoreml.server.dashboard import Dashboard, DashboardError, check_dashboard
from fedcoreml.server.dashboard.guard import COOKIE
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.tokens import DASHBOARD, TokenStore


def test_a_dashboard_token_opens_the_dashboard_and_not_the_device_port(tmp_path):
    store = TokenStore(tmp_path)
    viewer = store.create("alice", kind=DASHBOARD)
    device = store.create("phone-a")
    assert store.verify(viewer, kind=DASHBOARD) == "alice"
    assert store.verify(device) == "phone-a"
    with pytest.raises(GatewayError, match="unknown or revoked token"):
        store.verify(viewer)  # a device call with a dashboard token
    with pytest.raises(GatewayError, match="unknown or revoked token"):
        store.verify(device, kind=DASHBOARD)
    assert store.has_active(DASHBOARD) and store.has_active()
    store.revoke("alice")
    assert not store.has_active(DASHBOARD) and store.has_active()


def test_tokens_written_before_kinds_existed_are_device_tokens(tmp_path):
    store = TokenStore(tmp_path)
    secret = store.create("phone-a")
    document = json.loads(store.path.read_text())
    for entry in document["tokens"]:
        del entry["kind"]
    store.path.write_text(json.dumps(document))
    reread = TokenStore(tmp_path)
    assert [info.kind for info in reread.list()] == ["device"]
    assert reread.verify(secret) == "phone-a"


def test_fedcoreml_tokens_creates_and_lists_a_dashboard_token(tmp_path, capsys):
    assert main(["tokens", "create", "--run-dir", str(tmp_path), "--dashboard"]) == 0
    name, secret = capsys.readouterr().out.splitlines()[0].split()
    assert name == "dashboard"
    assert TokenStore(tmp_path).verify(secret, kind=DASHBOARD) == "dashboard"
    assert main(["tokens", "create", "--run-dir", str(tmp_path), "--device", "phone-a"]) == 0
    capsys.readouterr()
    assert main(["tokens", "list", "--run-dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:2] for row in rows] == [["DEVICE", "KIND"], ["dashboard", "dashboard"],
                                         ["phone-a", "device"]]  # fmt: skip


def test_fedcoreml_tokens_refuses_a_dashboard_token_mixed_with_devices(tmp_path, capsys):
    code = main(["tokens", "create", "--run-dir", str(tmp_path), "--dashboard", "--count", "2"])
    assert code == 2
    assert "--dashboard issues one dashboard token" in capsys.readouterr().err
    assert not (tmp_path / "tokens.json").exists()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0"])
def test_loopback_needs_no_token(tmp_path, listen):
    address, tokens = check_dashboard(listen, tmp_path / "run")
    assert address.loopback and tokens is None


def test_beyond_loopback_the_dashboard_refuses_to_start_without_a_dashboard_token(tmp_path):
    with pytest.raises(DashboardError, match=r"tokens create --run-dir .* --dashboard"):
        check_dashboard("0.0.0.0:0", tmp_path)
    TokenStore(tmp_path).create("phone-a")  # a device token does not count
    with pytest.raises(DashboardError, match="needs a dashboard token"):
        Dashboard("0.0.0.0:0", tmp_path)
    TokenStore(tmp_path).create("ops", kind=DASHBOARD)
    address, tokens = check_dashboard("0.0.0.0:0", tmp_path)
    assert not address.loopback and address.wildcard and tokens is not None


def test_fedcoreml_server_refuses_a_dashboard_beyond_loopback_before_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["server", "--run-dir", str(run_dir), "--rounds", "1", "--min-devices", "1",
                 "--insecure", "--listen", "127.0.0.1:0", "--dashboard", "0.0.0.0:0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "fedcoreml server: error: --dashboard 0.0.0.0:0 listens beyond loopback" in err
    assert not run_dir.exists()


def test_fedcoreml_server_refuses_a_malformed_dashboard_address(tmp_path, capsys):
    code = main(["server", "--run-dir", str(tmp_path / "run"), "--rounds", "1",
                 "--min-devices", "1", "--insecure", "--dashboard", "127.0.0.1:99999"])  # fmt: skip
    assert code == 2
    assert "--dashboard 127.0.0.1:99999: port 99999 is out of range" in capsys.readouterr().err


class AppClient:
    """Requests to an ASGI app in this process (no socket, nothing bound), cookies kept."""

    def __init__(self, app: Any, base_url: str = "http://dashboard.example:8080") -> None:
        self.transport = httpx.ASGITransport(app=app)
        self.base_url = base_url
        self.cookies = httpx.Cookies()

    def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url=self.base_url, cookies=self.cookies
            ) as client:
                response = await client.request(method, path, **options)
                self.cookies = client.cookies
                return response

        return asyncio.run(send())

    def get(self, path: str, **options: Any) -> httpx.Response:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> httpx.Response:
        return self.request("POST", path, **options)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[AppClient, TokenStore, str, str]]:
    """A dashboard app as bound beyond loopback: (client, store, dashboard token, device token)."""
    store = TokenStore(tmp_path)
    viewer = store.create("ops", kind=DASHBOARD)
    device = store.create("phone-a")
    yield AppClient(Dashboard("0.0.0.0:0", tmp_path).app), store, viewer, device


def test_without_a_dashboard_token_every_route_is_refused(guarded):
    client, _store, _viewer, device = guarded
    for path in ("/run", "/api/run", "/api/events", "/models/0.mlmodel", "/static/dashboard.js"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "needs a dashboard token" in response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/api/run", headers={"authorization": f"Bearer {device}"}).status_code == 401
    assert client.get("/api/run", params={"token": "fcm_guessed"}).status_code == 401
    assert client.post("/api/predict/0", content=b"x").status_code == 401


def test_a_token_in_the_url_becomes_a_cookie_and_leaves_the_address_bar(guarded):
    client, _store, viewer, _device = guarded
    response = client.get("/models", params={"token": viewer, "keep": "1"})
    assert response.status_code == 303
    assert response.headers["location"] == "/models?keep=1"
    cookie = response.headers["set-cookie"].lower()
    assert f"{COOKIE}=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/models").status_code == 200  # the client kept the cookie
    client.cookies = httpx.Cookies()
    assert client.get("/models").status_code == 401


def test_a_bearer_token_opens_the_api_until_it_is_revoked(guarded):
    client, store, viewer, _device = guarded
    headers = {"authorization": f"Bearer {viewer}"}
    response = client.get("/api/run", headers=headers)
    assert response.status_code == 200
    assert response.json()["rounds"] == []
    store.revoke("ops")
    assert client.get("/api/run", headers=headers).status_code == 401


def test_every_response_forbids_foreign_scripts_and_referrers(guarded):
    client, _store, viewer, _device = guarded
    for response in (client.get("/run"), client.get("/run", params={"token": viewer})):
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"


def test_on_loopback_only_loopback_host_names_are_answered(tmp_path):
    client = AppClient(Dashboard("127.0.0.1:0", tmp_path).app, base_url="http://127.0.0.1:8080")
    assert client.get("/api/run").status_code == 200
    assert client.get("/api/run", headers={"host": "localhost:8080"}).status_code == 200
    assert client.get("/api/run", headers={"host": "[::1]:8080"}).status_code == 200
    # a page elsewhere whose host name was pointed at 127.0.0.1 (DNS rebinding)
    rebound = client.get("/api/run", headers={"host": "attacker.example:8080"})
    assert rebound.status_code == 403
    assert "loopback only" in rebound.text
