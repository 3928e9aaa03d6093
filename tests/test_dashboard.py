"""The dashboard without a browser: what the pages are fed, and the web server's life.

The fleet snapshot (states, short ids, bounded strings, refusal counts), the run feed (reads
only when a file changed), the event streams (one read for every open page, nothing sent
twice), the models (exact committed bytes, summaries, predictions, a model that takes no digit)
and the server itself (binds, serves, stops its streams with the coordinator).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from live_gateway import Gateway
from model_zoo import handwritten_mlp
from PIL import Image
from real_runs import scripted_run

from fedcoreml.ios_bridge.channel import bearer_metadata
from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.interpreter import ReferenceInterpreter
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex, spec_from_bytes, spec_to_bytes
from fedcoreml.ios_bridge.predict import Predictor
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.server.dashboard import Dashboard, DashboardError
from fedcoreml.server.dashboard.app import MAX_IMAGE_BYTES
from fedcoreml.server.dashboard.fleet import SHOWN_ID_CHARS, FleetSource, fleet_snapshot
from fedcoreml.server.dashboard.hub import Hub, event_stream
from fedcoreml.server.dashboard.run_feed import RunFeed
from fedcoreml.server.gateway.auth import DeviceAuthInterceptor, RateLimiter
from fedcoreml.server.gateway.refusal_counts import RefusalCounts
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import RoundModel, TaskBoard, TaskConfig
from fedcoreml.server.gateway.tokens import TokenStore
from fedcoreml.server.run_dir import RunDirectory

MODEL = RoundModel.from_bytes(1, spec_to_bytes(build_default_model(seed=0)))
CONFIG = TaskConfig(epochs=1, batch_size=32, learning_rate=1e-3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the fleet ----------------------------------------------------------------------------------


def test_the_fleet_snapshot_counts_states_and_bounds_what_devices_sent():
    clock = Clock()
    registry = SessionRegistry(idle_ttl_s=10, clock=clock)
    board = TaskBoard(clock=clock)
    refusals = RefusalCounts()
    long_id = "A1B2C3D4-E5F6-4711-8899-AABBCCDDEEFF"
    registry.register("phone-gone", "iOS", "17.0", "1.9")
    clock.now += 11  # idle past the TTL: gone
    trainer = registry.register(long_id, "iOS", "18.1", "2.0")
    evaluator = registry.register("phone-b", "iOS", "18.1", "2.0")
    registry.register("phone-c", "\n" * 20 + "x" * 10_000, "", "1.9")
    board.assign(trainer.node_id, "train", 3, MODEL, CONFIG, 30)
    board.assign(evaluator.node_id, "evaluate", 2, MODEL, None, 30)
    for key in ("rate_limited", "rate_limited", "unknown_session"):
        refusals.add(key)

    fleet = fleet_snapshot(FleetSource(registry, board, refusals, min_devices=3))

    assert (fleet["registered"], fleet["connected"]) == (4, 3)
    assert (fleet["training"], fleet["evaluating"], fleet["idle"]) == (1, 1, 1)
    assert fleet["round_in_progress"] == 3
    assert fleet["tasks"] == [{"kind": "evaluate", "round": 2, "pending": 1},
                              {"kind": "train", "round": 3, "pending": 1}]  # fmt: skip
    assert fleet["refusals"] == {"rate_limited": 2, "unknown_session": 1}
    assert fleet["rate_limited"] == 2
    states = {row["device"]: row["state"] for row in fleet["devices"]}
    assert states == {long_id[:SHOWN_ID_CHARS] + "…": "training", "phone-b": "evaluating",
                      "phone-c": "idle", "phone-gone": "gone"}  # fmt: skip
    assert all(long_id not in json.dumps(row) for row in fleet["devices"])
    odd = next(row for row in fleet["devices"] if row["device"] == "phone-c")
    assert "\n" not in odd["platform"] and len(odd["platform"].encode()) <= 64
    assert fleet["by_platform"]["iOS"] == 3 and fleet["by_app_version"] == {"2.0": 2, "1.9": 2}
    gone = next(row for row in fleet["devices"] if row["device"] == "phone-gone")
    assert gone["last_seen_s"] == 11.0


def test_the_gateway_counts_its_refusals_by_reason(tmp_path):
    counts = RefusalCounts()
    store = TokenStore(tmp_path)
    token = store.create("phone-a")
    interceptor = DeviceAuthInterceptor(store, RateLimiter(rate_per_s=0.001, burst=2), counts)
    gateway = Gateway(interceptors=[interceptor])
    gateway.service.refusal_counts = counts  # as the coordinator wires them: one counter
    try:
        with pytest.raises(grpc.RpcError):
            gateway.stub.Register(device_pb2.RegisterRequest(device_id="phone-a"))  # no token
        auth = bearer_metadata(token)
        with pytest.raises(grpc.RpcError):  # authenticated, but no such session
            gateway.stub.GetTask(device_pb2.GetTaskRequest(session_id="nope"), metadata=auth)
        gateway.stub.Register(device_pb2.RegisterRequest(device_id="phone-a"), metadata=auth)
        with pytest.raises(grpc.RpcError) as limited:  # the burst of 2 is spent
            gateway.stub.Register(device_pb2.RegisterRequest(device_id="phone-a"), metadata=auth)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        gateway.close()
    assert counts.snapshot() == {"missing_token": 1, "unknown_session": 1, "rate_limited": 1}


# -- the run feed and the event streams ---------------------------------------------------------


def _commit(directory: RunDirectory, round_number: int, data: bytes, accuracy: float) -> None:
    directory.write_round_model(round_number, data)
    sha = sha256_hex(data)
    directory.append_commit({"round": round_number, "model_sha256": sha, "size_bytes": len(data)})
    directory.append_metrics({"round": round_number, "model_sha256": sha, "test_accuracy": accuracy,
                              "test_loss": 1.0, "seconds": 0.5})  # fmt: skip


def test_the_run_feed_reads_only_when_a_file_changed(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    feed = RunFeed(directory.path)
    assert feed.refresh() and feed.run_json()["phase"] == "starting"
    assert not feed.refresh()
    directory.write_config({"rounds": 2, "strategy": "fedavg", "run_id": 7})
    _commit(directory, 0, MODEL.data, 0.1)
    assert feed.refresh()
    run = feed.run_json()
    assert run["phase"] == "running" and run["rounds_planned"] == 2
    assert run["models"] == [{"version": 0, "sha256": MODEL.sha256, "size_bytes": len(MODEL.data)}]
    assert [line["test_accuracy"] for line in feed.rounds_json()] == [0.1]
    assert not feed.refresh()
    _commit(directory, 1, MODEL.data + b"", 0.5)
    assert feed.refresh() and len(feed.rounds_json()) == 2
    directory.write_final_model(MODEL.data)
    assert feed.refresh() and feed.run_json()["phase"] == "finished"


def test_a_damaged_run_directory_is_said_and_the_last_good_read_kept(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"rounds": 1, "run_id": 7})
    _commit(directory, 0, MODEL.data, 0.1)
    feed = RunFeed(directory.path)
    feed.refresh()
    with directory.commits_file.open("a") as commits:
        commits.write("{torn\n")
    assert feed.refresh()
    assert "commits.jsonl: not valid JSON lines" in feed.run_json()["error"]
    assert len(feed.rounds_json()) == 1


def _wait_until_read(url: str, done, timeout_s: float = 10.0) -> None:
    """Poll the dashboard's api/run until ``done(answer)`` holds (its reader caught up)."""
    deadline = time.monotonic() + timeout_s
    while not done(httpx.get(url + "api/run").json()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_model_file_changed_after_its_commit_is_never_served(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"rounds": 1, "run_id": 7})
    _commit(directory, 0, MODEL.data, 0.1)
    dashboard = Dashboard("127.0.0.1:0", directory.path)
    url = dashboard.start()
    try:
        _wait_until_read(url, lambda answer: answer["run"]["models"])
        directory.round_model(0).write_bytes(MODEL.data[:-1] + b"\0")
        for path in ("models/0.mlmodel", "api/models/0"):
            response = httpx.get(url + path)
            assert response.status_code == 500
            assert "is not the committed" in response.json()["error"]
        assert httpx.post(url + "api/predict/0", content=_png(_seven())).status_code == 500
    finally:
        dashboard.stop()


def _parse(chunks: list[str]) -> list[tuple[str, object]]:
    events = []
    for chunk in chunks:
        fields = dict(line.split(": ", 1) for line in chunk.strip().splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_many_event_streams_cost_one_read_and_each_gets_only_what_it_has_not_seen(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"rounds": 3, "run_id": 7})
    _commit(directory, 0, MODEL.data, 0.1)
    feed = RunFeed(directory.path)
    reads = []
    refresh = feed.refresh
    feed.refresh = lambda: reads.append(1) or refresh()
    hub = Hub(feed, fleet=None)

    async def scenario() -> list[list[tuple[str, object]]]:
        await hub.refresh(with_fleet=False)
        streams = [event_stream(hub) for _ in range(50)]
        seen: list[list[str]] = [[] for _ in streams]

        async def take(i: int, count: int) -> None:
            for _ in range(count):
                seen[i].append(await anext(streams[i]))

        # "retry", "run", "rounds" each
        await asyncio.gather(*(take(i, 3) for i in range(50)))
        assert hub.streams == 50
        _commit(directory, 1, MODEL.data, 0.4)
        await asyncio.gather(*(take(i, 2) for i in range(50)), hub.refresh(with_fleet=False))
        late = event_stream(hub)  # a page opened (or reconnected) later gets everything
        seen.append([await anext(late) for _ in range(3)])
        hub.close()
        for stream in [*streams, late]:
            await stream.aclose()
        assert hub.streams == 0
        return [_parse(chunks) for chunks in seen]

    pages = asyncio.run(scenario())
    assert len(reads) == 2  # one read per change, not one per stream
    for events in pages[:50]:
        assert [name for name, _ in events] == ["run", "rounds", "run", "rounds"]
        assert [line["round"] for line in events[1][1]["lines"]] == [0]
        assert events[3][1]["from"] == 1 and [ln["round"] for ln in events[3][1]["lines"]] == [1]
    late = pages[50]
    assert late[1][1]["from"] == 0 and [line["round"] for line in late[1][1]["lines"]] == [0, 1]


def test_a_failed_read_is_retried_and_never_ends_live_updates(tmp_path, caplog):
    calls = []

    class FlakyRegistry(SessionRegistry):
        def snapshot(self):
            calls.append(1)
            if len(calls) <= 3:
                raise RuntimeError("registry busy")
            return super().snapshot()

    fleet = FleetSource(FlakyRegistry(), TaskBoard(), RefusalCounts(), min_devices=1)
    hub = Hub(RunFeed(tmp_path / "run"), fleet, poll_s=0.01, fleet_every_s=0.0)

    async def scenario() -> None:
        poller = asyncio.create_task(hub.run())
        for _ in range(500):
            if hub.snapshot.fleet is not None:
                break
            await asyncio.sleep(0.01)
        hub.close()
        await poller

    asyncio.run(scenario())
    assert json.loads(hub.snapshot.fleet)["registered"] == 0
    failures = [r for r in caplog.records if "reading the run or the fleet failed" in r.message]
    assert len(calls) > 3 and len(failures) == 1  # logged once, not at every retry


# -- models and predictions over a real run -----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return scripted_run(tmp_path_factory.mktemp("dashboard") / "run", rounds=2, devices=2)


@pytest.fixture(scope="module")
def served(finished_run) -> str:
    dashboard = Dashboard("127.0.0.1:0", finished_run)
    url = dashboard.start()
    _wait_until_read(url, lambda answer: answer["rounds"])  # the first read is done
    yield url
    dashboard.stop()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _seven() -> np.ndarray:
    canvas = np.zeros((280, 280), np.uint8)
    canvas[60:80, 70:210] = 255
    for step in range(150):
        y, x = 80 + step, 200 - step // 2
        canvas[y : y + 18, x - 9 : x + 9] = 255
    return canvas


def test_every_committed_model_downloads_as_its_exact_bytes(served, finished_run):
    directory = RunDirectory(finished_run)
    for commit in directory.read_commits():
        response = httpx.get(f"{served}models/{commit['round']}.mlmodel")
        assert response.status_code == 200
        assert sha256_hex(response.content) == commit["model_sha256"]
        assert response.headers["x-model-sha256"] == commit["model_sha256"]
        assert f"round-{commit['round']:04d}.mlmodel" in response.headers["content-disposition"]
    final = httpx.get(f"{served}models/final.mlmodel")
    assert final.content == directory.final_model.read_bytes()


def test_a_models_summary_is_model_inspects(served, finished_run):
    info = httpx.get(f"{served}api/models/1").json()
    assert info["sha256"] == sha256_hex(RunDirectory(finished_run).round_model(1).read_bytes())
    assert info["trainable"] and info["digit_input"] and info["total_parameters"] == 585_958
    assert [layer["name"] for layer in info["layers"]][:2] == ["conv1", "relu1"]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("api/models/9", 404, "round 9 has no committed model"),
        ("api/models/latest", 404, "must be a round number or 'final'"),
        ("api/models/..%2F..%2Frun.json", 404, "Not Found"),
        ("models/-1.mlmodel", 404, "must be a round number or 'final'"),
    ],
)
def test_a_model_the_run_did_not_commit_is_refused(served, path, status, message):
    response = httpx.get(served + path)
    assert response.status_code == status
    assert message in response.text


def test_a_prediction_is_the_reference_interpreters_on_the_exact_bytes(served, finished_run):
    image = _png(_seven())
    for version, path in (("1", "models/round-0001.mlmodel"), ("final", "final.mlmodel")):
        answer = httpx.post(f"{served}api/predict/{version}", content=image).json()
        data = (finished_run / path).read_bytes()
        assert answer["sha256"] == sha256_hex(data)
        expected = Predictor(data).predict(image)
        assert answer["label"] == expected.label
        assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
        seen = np.array(answer["image"], dtype=np.float32)
        assert seen.shape == (28, 28)
        # the 28x28 the page shows is what the interpreter was given
        spec = spec_from_bytes(data)
        out = ReferenceInterpreter(spec).predict(seen.reshape(1, 1, 28, 28), ["output"])["output"]
        assert str(int(np.argmax(out))) == answer["label"]


def test_a_drawing_that_is_no_image_or_too_large_is_refused(served):
    bad = httpx.post(f"{served}api/predict/final", content=b"not a png")
    assert bad.status_code == 400 and "not a readable PNG" in bad.json()["error"]
    big = httpx.post(f"{served}api/predict/final", content=b"\0" * (MAX_IMAGE_BYTES + 1))
    assert big.status_code == 413


def _not_a_digit_model() -> bytes:
    """An updatable MLP over 100 features: runs, trains, but takes no 28x28 image."""
    spec = handwritten_mlp()
    spec.description.input[0].type.multiArrayType.shape[:] = [100]
    spec.description.trainingInput[0].type.multiArrayType.shape[:] = [100]
    hidden = spec.neuralNetwork.layers[0].innerProduct
    hidden.inputChannels = 100
    hidden.weights.floatValue[:] = np.zeros(64 * 100, np.float32).tolist()
    return spec_to_bytes(spec)


def test_a_model_that_takes_no_digit_is_told_plainly(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.write_config({"rounds": 1, "run_id": 7})
    _commit(directory, 0, _not_a_digit_model(), 0.1)
    dashboard = Dashboard("127.0.0.1:0", directory.path)
    url = dashboard.start()
    try:
        _wait_until_read(url, lambda answer: answer["run"]["models"])
        info = httpx.get(url + "api/models/0").json()
        assert not info["digit_input"] and "has shape [100]" in info["digit_problem"]
        answer = httpx.post(url + "api/predict/0", content=_png(_seven()))
        assert answer.status_code == 422
        assert "predict takes a 28x28 grey image" in answer.json()["error"]
    finally:
        dashboard.stop()


# -- the server's life --------------------------------------------------------------------------


def test_a_port_in_use_is_refused_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DashboardError, match=rf"--dashboard 127.0.0.1:{port}: cannot listen"):
            Dashboard(f"127.0.0.1:{port}", tmp_path).start()


def test_stopping_ends_open_event_streams_at_once(tmp_path):
    dashboard = Dashboard("127.0.0.1:0", tmp_path)
    url = dashboard.start()
    received: list[str] = []
    ended = threading.Event()

    def listen() -> None:
        try:
            with httpx.stream("GET", url + "api/events", timeout=30) as response:
                for line in response.iter_lines():
                    received.append(line)
        except httpx.HTTPError:
            pass
        ended.set()

    threading.Thread(target=listen, daemon=True).start()
    deadline = time.monotonic() + 10
    while "event: run" not in received:
        assert time.monotonic() < deadline, received
        time.sleep(0.02)
    start = time.monotonic()
    dashboard.stop()
    assert ended.wait(5), "the stream outlived the dashboard"
    assert time.monotonic() - start < 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/run")


def test_the_demo_serves_a_dashboard_by_default_and_prints_its_url(tmp_path):
    from rich.console import Console

    from fedcoreml.server.cli import build_parser
    from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
    from fedcoreml.server.demo import _start_dashboard

    parser = build_parser()
    assert parser.parse_args(["demo"]).dashboard == "127.0.0.1:0"
    assert parser.parse_args(["demo", "--no-dashboard"]).dashboard is None
    config = CoordinatorConfig(run_dir=tmp_path / "run", rounds=1, min_devices=1)
    coordinator = Coordinator(config)
    console = Console(file=io.StringIO(), soft_wrap=True)
    args = parser.parse_args(["demo"])
    dashboard = _start_dashboard(args, coordinator, console)
    try:
        printed = console.file.getvalue()
        assert printed == f"dashboard: {dashboard.url} (live while the demo runs)\n"
        assert dashboard.url.startswith("http://127.0.0.1:")
        assert httpx.get(dashboard.url + "api/fleet").json()["min_devices"] == 1
    finally:
        dashboard.stop()
    off = parser.parse_args(["demo", "--no-dashboard"])
    assert _start_dashboard(off, coordinator, console) is None


def test_fedcoreml_server_serves_the_dashboard_until_it_stops(tmp_path):
    import signal
    import subprocess
    import sys

    server = subprocess.Popen(
        [sys.executable, "-m", "fedcoreml.server.cli", "server", "--run-dir", str(tmp_path / "run"),
         "--rounds", "1", "--min-devices", "1", "--insecure", "--listen", "127.0.0.1:0",
         "--dashboard", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        assert line.startswith("dashboard: http://127.0.0.1:"), line
        url = line.split()[1]
        deadline = time.monotonic() + 20
        while httpx.get(url + "api/run").json()["run"]["phase"] != "running":
            assert time.monotonic() < deadline, "the run never showed as running"
            time.sleep(0.1)
        assert httpx.get(url + "api/fleet").json()["connected"] == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        server.kill()
        server.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/run")


def test_with_the_coordinators_tls_certificate_the_dashboard_speaks_https(tmp_path):
    from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
    from fedcoreml.server.dashboard import start_dashboard
    from fedcoreml.server.gateway.tls import generate_test_ca

    certs = generate_test_ca(tmp_path / "tls")
    config = CoordinatorConfig(run_dir=tmp_path / "run", rounds=1, min_devices=1,
                               tls_cert=certs.server_cert, tls_key=certs.server_key)  # fmt: skip
    dashboard = start_dashboard(Coordinator(config), "127.0.0.1:0")
    try:
        assert dashboard.url.startswith("https://127.0.0.1:")
        ca = ssl.create_default_context(cafile=str(certs.ca_cert))
        trusted = httpx.get(dashboard.url + "api/run", verify=ca)
        assert trusted.status_code == 200
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
            httpx.get(dashboard.url + "api/run")
    finally:
        dashboard.stop()
