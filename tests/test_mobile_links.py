"""Devices behind bad mobile links, each in its own network namespace (issue #11 item 4).

A real ``fedcoreml server`` listens on a test-made bridge; five ``fedcoreml devices`` processes,
one device each, run in their own namespaces (tests/netns.py), each linked to the bridge by a
veth pair that carries one impairment both ways: 300 ms delay, 2 % loss, 2 Mbit/s, 2 Mbit/s with
the link cut in the middle of the first model download (down for a few seconds, the device's
connections closed, as a phone's OS does when its network goes away) and all three together.

Synchronous rounds: every round completes with every device, each device's downloads verify
(size and sha256, checked by DeviceClient before it trains), the cut download resumes where it
stopped (and the link carries no more bytes than without the cut, less the part that was held),
and the coordinator accepts exactly one update per device and round. Asynchronous
(``--strategy fedbuff``), at the same time over a second set of the same links, cut included:
every version is published, every device ends cleanly, the cut download resumes and verifies,
and no update is accepted or applied twice.

How each impairment was applied (netem, or what the kernel offers instead) is printed and
written next to the runs (``links.json``); one test per impairment checks that it took effect
(round trip, goodput, drop share) or skips with the exact reason it could not be applied. The
tests need root (CAP_NET_ADMIN) and skip, saying so, without it.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netns import Impairment, Link, TestNetwork, measure, unavailable_reason

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic
from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.server.gateway.service import DOWNLOAD_CHUNK_BYTES

pytestmark = pytest.mark.slow  # real processes over shaped links: deselect with -m "not slow"

CLI = [sys.executable, "-m", "fedcoreml.server.cli"]
LINKS: dict[str, Impairment] = {
    "delay": Impairment(delay_ms=300),
    "loss": Impairment(loss=0.02),
    "rate": Impairment(rate_mbit=2),
    "cut": Impairment(rate_mbit=2),  # and cut in the middle of the first download
    "mobile": Impairment(delay_ms=300, loss=0.02, rate_mbit=2),
}
CUT_LINK, CUT_BASELINE = "cut", "rate"  # the same link, without the cut
OUTAGE_S = 3.0
ROUNDS = 2
VERSIONS, BUFFER = 3, 4  # asynchronous run: 12 applied updates
COMMON = ["--insecure", "--min-devices", str(len(LINKS)), "--local-epochs", "1",
          "--batch-size", "32", "--lr", "0.001", "--handout-rate", "0"]  # fmt: skip
SYNC = ["--rounds", str(ROUNDS), "--round-timeout", "180"]
ASYNC = ["--strategy", "fedbuff", "--versions", str(VERSIONS), "--concurrency", str(len(LINKS)),
         "--buffer", str(BUFFER), "--linger"]  # fmt: skip
RUN_TIMEOUT_S = 240


@dataclass
class Links:
    """One set of namespaces (one per entry of LINKS) and what a probe measured on each."""

    net: TestNetwork
    links: dict[str, Link]
    measured: dict[str, dict[str, float]]
    root: Path


@dataclass
class Cut:
    """What the cut did: when, and how many bytes of the run had gone down the link by then."""

    at: float | None = None
    bytes_before: int = 0
    error: str | None = None


@dataclass
class Outcome:
    run_dir: Path
    server_log: str
    server_returncode: int | None
    device_logs: dict[str, str]
    device_returncodes: dict[str, int | None]
    bytes_down: dict[str, int]  # per link, from the devices' start to the run's end
    queues: dict[str, dict[str, dict[str, int]]]  # per link: root qdisc counters at the end
    cut: Cut = field(default_factory=Cut)

    def lines(self, name: str) -> list[dict]:
        return [json.loads(x) for x in (self.run_dir / name).read_text().splitlines()]

    def owners(self) -> dict[int, str]:
        """Node id -> device id, from the coordinator's registration lines."""
        found = re.findall(r"device '([^']+)' registered .* as node (\d+)", self.server_log)
        return {int(node): device for device, node in found}

    def gateway_accepted(self) -> Counter:
        """(device id, round or version trained on) -> updates the gateway accepted."""
        owner = self.owners()
        updates = re.findall(r"update for round (\d+) from node (\d+):", self.server_log)
        return Counter((owner[int(node)], int(number)) for number, node in updates)


# -- running fleets over the links ------------------------------------------------------------


def wait_for_port(log: Path, server: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening for devices on port (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if server.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail("the coordinator did not start listening:\n" + log.read_text()[-3000:])


def cut_mid_download(link: Link, peer: str, run_dir: Path, start_bytes: int, cut: Cut,
                     stop: threading.Event) -> None:  # fmt: skip
    """Cut ``link`` once the device is inside the second chunk of its first download.

    The device keeps whole chunks only, so a cut there leaves it holding the first chunk: it must
    ask for the rest from that offset. Nothing else this large goes down the link before then.
    """
    try:
        while not (models := list(run_dir.glob("models/*-0000.mlmodel"))):
            if stop.wait(0.05):
                return
        size = models[0].stat().st_size
        if size < 1.2 * DOWNLOAD_CHUNK_BYTES:
            raise AssertionError(f"the model ({size} bytes) fits in one download chunk")
        threshold = start_bytes + DOWNLOAD_CHUNK_BYTES + (size - DOWNLOAD_CHUNK_BYTES) // 3
        while link.bytes_to_device() < threshold:
            if stop.wait(0.01):
                return
        cut.bytes_before = link.bytes_to_device() - start_bytes
        try:
            link.cut(peer)
            cut.at = time.monotonic()
            stop.wait(OUTAGE_S)
        finally:
            link.restore()
        link.applied["cut"] = (
            f"link down {OUTAGE_S:g} s after {cut.bytes_before} bytes of the first "
            f"{size}-byte download, the device's TCP connections closed (ss -K)"
        )
    except Exception as exc:  # reported by the tests
        cut.error = f"{type(exc).__name__}: {exc}"
        link.missing["cut"] = cut.error


def run_fleet(env: Links, name: str, server_args: list[str]) -> Outcome:
    """A coordinator on the bridge and one ``fedcoreml devices`` process per link, to the end.

    A coordinator started with ``--linger`` is stopped (SIGTERM) once every device has ended.
    """
    root = env.root
    run_dir, server_log = root / "run", root / "server.log"
    net, links = env.net, env.links
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [*CLI, "server", "--listen", f"{net.address}:0", "--run-dir", str(run_dir), *COMMON,
             *server_args],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    devices: dict[str, subprocess.Popen] = {}
    stop, outage = threading.Event(), Cut()
    watcher = None
    try:
        address = f"{net.address}:{wait_for_port(server_log, server)}"
        start_bytes = {label: link.bytes_to_device() for label, link in links.items()}
        for seed, (label, link) in enumerate(links.items()):
            with (root / f"{label}.log").open("wb") as out:
                devices[label] = subprocess.Popen(
                    link.command([*CLI, "devices", "--server", address, "--count", "1",
                                  "--limit", "100", "--seed", str(seed), "--device-prefix",
                                  label]),
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
        watcher = threading.Thread(
            target=cut_mid_download,
            args=(links[CUT_LINK], net.address, run_dir, start_bytes[CUT_LINK], outage, stop),
        )
        watcher.start()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for process in [*devices.values(), server]:
            if process is server and "--linger" in server_args:
                server.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        bytes_down = {label: link.bytes_to_device() - start_bytes[label]
                      for label, link in links.items()}  # fmt: skip
        queues = {label: link.queue_stats() for label, link in links.items()}
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        for process in [*devices.values(), server]:
            if process.poll() is None:
                process.kill()
                process.wait()
    record = {
        "links": [x.report() for x in links.values()],
        "measured_before_the_run": env.measured,
        "queues": queues,
        "relays": {x.label: x.relay.describe() for x in links.values() if x.relay},
    }
    write_bytes_atomic(root / "links.json", json.dumps(record, indent=1).encode())
    print(f"{name} run over the mobile links:", json.dumps(record, indent=1))  # -s or failure
    return Outcome(
        run_dir=run_dir, server_log=server_log.read_text(errors="replace"),
        server_returncode=server.returncode,
        device_logs={x: (root / f"{x}.log").read_text(errors="replace") for x in devices},
        device_returncodes={label: p.returncode for label, p in devices.items()},
        bytes_down=bytes_down, queues=queues, cut=outage,
    )  # fmt: skip


def make_links(net: TestNetwork, name: str, root: Path) -> Links:
    made = {label: net.add(f"{name}-{label}", imp) for label, imp in LINKS.items()}
    return Links(net, made, {}, root / name)


@pytest.fixture(scope="module")
def links(tmp_path_factory) -> Iterator[dict[str, Links]]:
    """Two sets of the same links, one per run: the runs go on at the same time."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"mobile-link tests need network namespaces: {reason}")
    root = tmp_path_factory.mktemp("mobile-links")
    with TestNetwork() as net:
        sets = {name: make_links(net, name, root) for name in ("sync", "async")}
        with concurrent.futures.ThreadPoolExecutor(2 * len(LINKS)) as pool:
            probes = {
                (name, label): pool.submit(measure, link, net.address, 100_000)
                for name, made in sets.items()
                for label, link in made.links.items()
            }
            for (name, label), probe in probes.items():
                sets[name].measured[label] = probe.result()
        for made in sets.values():
            made.root.mkdir()
        yield sets


@pytest.fixture(scope="module")
def runs(links) -> dict[str, Outcome]:
    """The synchronous run and the asynchronous one, side by side."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sync = pool.submit(run_fleet, links["sync"], "sync", SYNC)
        fedbuff = pool.submit(run_fleet, links["async"], "async", ASYNC)
        return {"sync": sync.result(), "async": fedbuff.result()}


@pytest.fixture(scope="module")
def sync_run(runs) -> Outcome:
    return runs["sync"]


@pytest.fixture(scope="module")
def async_run(runs) -> Outcome:
    return runs["async"]


# -- checks -----------------------------------------------------------------------------------


def device_id(label: str) -> str:
    return f"{label}-000"


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def check_devices_ended_well(run: Outcome) -> dict[str, int]:
    """Every device process finished the run, never fetched a model twice; its training size."""
    training = {}
    for label, log in run.device_logs.items():
        assert run.device_returncodes[label] == 0, f"{label}:\n{tail(log)}"
        found = re.search(rf"{device_id(label)}: starting with (\d+) training", log)
        assert found, tail(log)
        training[label] = int(found.group(1))
        ended = re.search(rf"^{device_id(label)}: trained .*; (\w+)$", log, re.MULTILINE)
        assert ended and ended.group(1) == "finished", tail(log)
        assert "sha256 mismatch" not in log and "downloading again" not in log, tail(log)
    return training


def device_acceptances(run: Outcome, label: str) -> list[tuple[str, int]]:
    """(task id, round) of every update the device was told was accepted."""
    found = re.findall(rf"{device_id(label)}: update for task (\w+) accepted \(round (\d+)\)",
                       run.device_logs[label])  # fmt: skip
    return [(task, int(number)) for task, number in found]


def check_models_are_the_committed_ones(run: Outcome, prefix: str, last: int) -> None:
    metrics = run.lines("metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(last + 1))
    models = run.run_dir / "models"
    for line in metrics:  # the files devices downloaded (and verified) are the committed ones
        path = models / f"{prefix}-{line['round']:04d}.mlmodel"
        assert sha256_hex(path.read_bytes()) == line["model_sha256"]
    final = (models / f"{prefix}-{last:04d}.mlmodel").read_bytes()
    assert (run.run_dir / "final.mlmodel").read_bytes() == final


# -- synchronous rounds -----------------------------------------------------------------------


def test_every_round_completes_with_every_device_over_the_impaired_links(sync_run):
    assert sync_run.server_returncode == 0, tail(sync_run.server_log)
    training = check_devices_ended_well(sync_run)
    for label, log in sync_run.device_logs.items():  # trained every round, never dropped one
        summary = re.search(rf"^{device_id(label)}: trained (\d+), evaluated \d+, failures (\d+)",
                            log, re.MULTILINE)  # fmt: skip
        assert summary and summary.groups() == (str(ROUNDS), "0"), tail(log)
    check_models_are_the_committed_ones(sync_run, "round", ROUNDS)
    for line in sync_run.lines("metrics.jsonl")[1:]:
        assert line["devices_sampled"] == line["devices_reported"] == len(LINKS), line
        assert line["devices_failed"] == 0 and line["abandoned_attempts"] == 0, line
        assert line["examples"] == sum(training.values()), (line, training)


def test_the_coordinator_accepts_one_update_per_device_and_round(sync_run):
    accepted = sync_run.gateway_accepted()
    expected = {(device_id(label), r) for label in LINKS for r in range(1, ROUNDS + 1)}
    assert set(accepted) == expected, accepted
    assert set(accepted.values()) == {1}, accepted
    for label in LINKS:  # and each device was told of one acceptance per round, each a new task
        told = device_acceptances(sync_run, label)
        assert sorted(r for _, r in told) == list(range(1, ROUNDS + 1)), told
        assert len({task for task, _ in told}) == ROUNDS, told


def check_the_cut_download_resumed(run: Outcome) -> tuple[str, int]:
    """The cut download was asked for again from the chunk the device held, and the device
    trained on the whole model, which it verifies (size, sha256) first: (task id, offset)."""
    if run.cut.at is None:
        pytest.fail(f"the link was never cut: {run.cut.error or 'the download never got there'}")
    log = run.device_logs[CUT_LINK]
    resumed = re.findall(
        rf"{device_id(CUT_LINK)}: DownloadModel of task (\w+) \(resuming at byte (\d+)\) failed",
        log,
    )
    assert resumed, tail(log)
    task, offset = resumed[0][0], int(resumed[0][1])
    # it held the first chunk when the link went, and asked for the rest from there ...
    assert offset >= DOWNLOAD_CHUNK_BYTES and offset % DOWNLOAD_CHUNK_BYTES == 0, resumed
    assert offset <= run.cut.bytes_before
    # ... then got it and trained (the next thing it did with that task)
    after = log[log.rindex(f"(resuming at byte {offset})") :]
    outcome = re.search(rf"{device_id(CUT_LINK)}: (trained on|dropped task|train task)", after)
    assert outcome and outcome.group(1) == "trained on", tail(log)
    retries = re.search(rf"^{device_id(CUT_LINK)}: .* retries (\d+)", log, re.MULTILINE)
    assert retries and int(retries.group(1)) >= 1, tail(log)
    return task, offset


def test_a_download_cut_midway_resumes_from_where_it_stopped_and_verifies(sync_run):
    task, offset = check_the_cut_download_resumed(sync_run)
    assert (task, 1) in device_acceptances(sync_run, CUT_LINK), tail(sync_run.device_logs[CUT_LINK])
    # The same link without the cut carried the same run: a download started over from byte 0
    # would have sent the `offset` bytes the device held once more; a resumed one sends again at
    # most the part of a chunk that was on its way when the link went.
    extra = sync_run.bytes_down[CUT_LINK] - sync_run.bytes_down[CUT_BASELINE]
    assert extra < offset, (sync_run.bytes_down, offset)


# -- asynchronous versions (FedBuff) ----------------------------------------------------------


def test_versions_complete_over_the_impaired_links_and_no_update_counts_twice(async_run):
    assert async_run.server_returncode == 0, tail(async_run.server_log)
    check_devices_ended_well(async_run)
    check_the_cut_download_resumed(async_run)
    check_models_are_the_committed_ones(async_run, "version", VERSIONS)
    owner = async_run.owners()
    applied = [u for c in async_run.lines("commits.jsonl")[1:] for u in c["applied"]]
    assert len(applied) == VERSIONS * BUFFER
    # every applied update is a different one ...
    assert len({u["update_sha256"] for u in applied}) == len(applied), applied
    gateway = Counter()
    for (device, _), count in async_run.gateway_accepted().items():
        gateway[device] += count
    per_device = Counter(owner[u["node_id"]] for u in applied)
    for label in LINKS:
        # ... each device trained on models it downloaded over its link and verified ...
        trained = re.findall(rf"{device_id(label)}: trained on \d+ examples",
                             async_run.device_logs[label])  # fmt: skip
        assert trained, tail(async_run.device_logs[label])
        # ... and the coordinator took each of its tasks' updates once, as the device was told
        told = device_acceptances(async_run, label)
        assert len({task for task, _ in told}) == len(told), told
        assert gateway[device_id(label)] == len(told), (label, gateway, told)
        assert per_device[device_id(label)] <= len(told), (label, per_device, told)
    # (fast links send more: FedBuff takes updates as they come; printed, not asserted)
    print("applied updates per device:", dict(per_device),
          "staleness:", [u["staleness"] for u in applied])  # fmt: skip


# -- each impairment took effect, or the reason it could not be applied ---------------------

CASES = [(run, label, kind) for run in ("sync", "async") for label, imp in LINKS.items()
         for kind in imp.kinds]  # fmt: skip
CASES += [(run, CUT_LINK, "cut") for run in ("sync", "async")]


@pytest.mark.parametrize(("run", "label", "kind"), CASES, ids=["-".join(c) for c in CASES])
def test_each_impairment_was_applied(links, runs, run, label, kind, record_property):
    link = links[run].links[label]
    if kind in link.missing:
        pytest.skip(f"{link.label} link: {kind} not applied: {link.missing[kind]}")
    record_property("applied", link.applied[kind])
    imp, measured = link.impairment, links[run].measured[label]
    if kind == "delay":
        round_trip = 2 * imp.delay_ms
        assert round_trip * 0.95 <= measured["rtt_ms"] <= round_trip + 150, measured
    elif kind == "rate":
        for way in ("down_mbit", "up_mbit"):
            assert measured[way] <= 1.15 * imp.rate_mbit, measured
            if not imp.delay_ms:  # with delay, a short probe is slow-start bound
                assert measured[way] >= 0.5 * imp.rate_mbit, measured
    elif kind == "loss":  # over the run's thousands of packets each way
        for way, stats in runs[run].queues[label].items():
            share = stats["drops"] / (stats["packets"] + stats["drops"])
            assert stats["packets"] > 1000 and imp.loss / 4 < share < imp.loss * 3, (way, stats)
    elif kind == "cut":
        assert runs[run].cut.at is not None and runs[run].cut.error is None, runs[run].cut
