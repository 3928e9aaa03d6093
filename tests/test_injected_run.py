"""A run under attack ends with exactly the model of the same run in peace.

Two seeded runs with the same devices, tokens and run id: one clean, one where every device
sends each kind of malformed request on its own session before and after its honest submission,
and a stranger keeps hammering the port. Every hostile request must be refused with the expected
status and message, and every round's global model must be bit-identical between the runs.
"""

from __future__ import annotations

import json
import threading

import pytest
from hostile_requests import EXPECTED, DeviceAttacks, Outcomes, OutsiderAttacks, Peers
from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig
from fedcoreml.server.gateway.tokens import TokenStore

pytestmark = pytest.mark.slow  # a whole federated run: deselect with -m "not slow"

DEVICES = [("phone-a", 120, 0.01), ("phone-b", 310, -0.02), ("phone-c", 575, 0.03),
           ("phone-d", 64, 0.002)]  # fmt: skip
RUN_ID = 20261130


def run(run_dir, strategy: str, attack: bool) -> tuple[list[str], bytes, Outcomes]:
    store = TokenStore(run_dir)
    tokens = {device_id: store.create(device_id) for device_id, _, _ in DEVICES}
    revoked = store.create("phone-gone")
    store.revoke("phone-gone")
    config = CoordinatorConfig(
        run_dir=run_dir, rounds=3, min_devices=len(DEVICES), fraction_evaluate=1.0,
        strategy=strategy, round_timeout=60, session_ttl=10, poll_interval_ms=50,
        require_tokens=True, rate_limit=10_000,
    )  # fmt: skip
    coordinator = Coordinator(config, run_id=RUN_ID)
    address = f"127.0.0.1:{coordinator.start()}"
    outcomes, peers = Outcomes(), Peers()
    devices = []
    for device_id, examples, offset in DEVICES:
        device = ScriptedDevice(address, device_id, examples, offset, token=tokens[device_id],
                                noise=0.01)  # fmt: skip
        if attack:
            hooks = DeviceAttacks(device_id, outcomes, peers)
            device.before_submit = hooks.before_submit
            device.after_submit = hooks.after_submit
            device.before_evaluation = hooks.before_evaluation
        devices.append(device)
    stop, threads = start_devices(devices)
    if attack:
        outsider = OutsiderAttacks(address, outcomes, revoked, ("phone-a", tokens["phone-a"]))
        outsider.once()  # before the run, then all through it
        threads.append(threading.Thread(target=outsider.run, args=(stop,), daemon=True))
        threads[-1].start()
    final = run_to_the_end(coordinator, stop, threads)
    for device in devices:
        assert device.error is None, device.error
        assert device.finished and not device.refused
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["devices_reported"] for line in lines[1:]] == [4, 4, 4]
    return [line["model_sha256"] for line in lines], final.read_bytes(), outcomes


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
def test_all_hostile_requests_are_refused_and_the_model_is_bit_identical(tmp_path, strategy):
    clean_hashes, clean_final, _ = run(tmp_path / "clean", strategy, attack=False)
    hashes, final, outcomes = run(tmp_path / "attacked", strategy, attack=True)
    assert outcomes.mismatches() == []
    missing = sorted(set(EXPECTED) - set(outcomes.seen))
    assert missing == []
    assert len(outcomes.seen) >= 25  # 39 kinds
    assert sum(len(v) for v in outcomes.seen.values()) > 200
    assert hashes == clean_hashes
    assert final == clean_final
    assert len(set(hashes)) == 4  # the model really changed every round
