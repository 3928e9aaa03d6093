"""The coordinator end to end over real sockets on 127.0.0.1, with Flower's strategies."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from protocol_devices import ScriptedDevice, run_to_the_end, start_devices

from fedcoreml.ios_bridge.mlmodel_io import load_spec
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.server.coordinator import Coordinator, CoordinatorConfig


def run_coordinator(tmp_path, devices_spec, **overrides):
    settings = {
        "run_dir": tmp_path / "run",
        "rounds": 2,
        "min_devices": len(devices_spec),
        "round_timeout": 30,
        "session_ttl": 3,
        "poll_interval_ms": 50,
        **overrides,
    }
    config = CoordinatorConfig(**settings)
    coordinator = Coordinator(config)
    port = coordinator.start()
    devices = [
        ScriptedDevice(f"127.0.0.1:{port}", f"phone-{i}", n, offset, die)
        for i, (n, offset, die) in enumerate(devices_spec)
    ]
    stop, threads = start_devices(devices)
    deadline = time.monotonic() + 30  # every device in before the first round samples
    while len(coordinator.registry.live_node_ids()) < len(devices):
        assert time.monotonic() < deadline, "the devices did not all register"
        time.sleep(0.02)
    final = run_to_the_end(coordinator, stop, threads)
    for device in devices:
        assert device.error is None, device.error
    return coordinator, devices, final


def weighted_mean(submissions):
    total = sum(s.num_examples for s in submissions)
    names = [n for n, _ in submissions[0].parameters]
    return {
        name: sum(dict(s.parameters)[name].astype(np.float64) * s.num_examples
                  for s in submissions) / total
        for name in names
    }  # fmt: skip


@pytest.mark.parametrize("mean_on_arrival", [True, False], ids=["mean-on-arrival", "hold"])
def test_fedavg_is_the_examples_weighted_mean_of_what_devices_sent(tmp_path, mean_on_arrival):
    spec = [(100, 0.01, None), (300, -0.02, None), (600, 0.05, None)]
    _coordinator, devices, final = run_coordinator(
        tmp_path, spec, fraction_evaluate=1.0, mean_on_arrival=mean_on_arrival
    )
    run = tmp_path / "run"
    for round_number in (1, 2):
        sent = [s for d in devices for s in d.submissions if s.round == round_number]
        assert len(sent) == 3
        expected = weighted_mean(sent)
        shipped = dict(
            get_parameters(load_spec(run / "models" / f"round-{round_number:04d}.mlmodel"))
        )
        for name, value in expected.items():
            np.testing.assert_allclose(shipped[name], value, rtol=1e-6, atol=1e-7)
    # round 2 trained on exactly the model of round 1 that the server shipped
    round1 = dict(get_parameters(load_spec(run / "models" / "round-0001.mlmodel")))
    first_r2 = next(s for s in devices[0].submissions if s.round == 2)
    for name, value in first_r2.parameters:
        np.testing.assert_array_equal(value, (round1[name] + np.float32(0.01)).astype(np.float32))
    assert load_spec(final) == load_spec(run / "models" / "round-0002.mlmodel")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert lines[1]["devices_sampled"] == 3 and lines[1]["devices_reported"] == 3
    assert lines[1]["examples"] == 1000 and lines[2]["evaluated_devices"] == 3
    assert all(d.finished for d in devices)
    assert json.loads((run / "run.json").read_text())["strategy"] == "fedavg"


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedmedian"])
def test_other_flower_strategies_drive_the_devices(tmp_path, strategy):
    spec = [(100, 0.01, None), (300, -0.02, None), (600, 0.05, None)]
    _coordinator, devices, _ = run_coordinator(tmp_path, spec, strategy=strategy)
    run = tmp_path / "run"
    r0 = dict(get_parameters(load_spec(run / "models" / "round-0000.mlmodel")))
    r1 = dict(get_parameters(load_spec(run / "models" / "round-0001.mlmodel")))
    sent = [s for d in devices for s in d.submissions if s.round == 1]
    if strategy == "fedmedian":
        # the coordinate-wise median of received + {0.01, -0.02, 0.05} is received + 0.01
        for name, value in r0.items():
            np.testing.assert_allclose(r1[name], value + np.float32(0.01), atol=1e-6)
    elif strategy == "fedavgm":
        # no server momentum by default: FedAvgM with lr 1 and momentum 0 is FedAvg
        expected = weighted_mean(sent)
        for name, value in expected.items():
            np.testing.assert_allclose(r1[name], value, rtol=1e-5, atol=1e-6)
    else:
        # FedAdam's first server step (Flower defaults eta 0.1, beta1 0.9, beta2 0.99, tau 1e-3)
        # on the pseudo-gradient delta = weighted mean of the device offsets = +0.025.
        delta = (100 * 0.01 + 300 * -0.02 + 600 * 0.05) / 1000
        eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
        step = eta_norm * 0.1 * delta / (np.sqrt(0.01 * delta**2) + 1e-3)
        for name, value in r0.items():
            np.testing.assert_allclose(r1[name] - value, step, rtol=1e-3)


def test_a_device_that_dies_mid_round_does_not_hang_the_run(tmp_path):
    spec = [(100, 0.01, None), (300, -0.02, None), (600, 0.05, 1)]  # the third dies in round 1
    _coordinator, devices, _ = run_coordinator(tmp_path, spec, min_devices=2, round_timeout=4)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["devices_sampled"] == 3
    assert lines[1]["devices_reported"] == 2 and lines[1]["devices_failed"] == 1
    sent = [s for d in devices for s in d.submissions if s.round == 1]
    r1 = dict(get_parameters(load_spec(tmp_path / "run" / "models" / "round-0001.mlmodel")))
    for name, value in weighted_mean(sent).items():
        np.testing.assert_allclose(r1[name], value, rtol=1e-6, atol=1e-7)
    assert lines[2]["devices_sampled"] == 2  # the dead device is no longer a node


def test_krum_picks_one_devices_update_exactly(tmp_path):
    spec = [(100, 0.01, None), (300, -0.02, None), (600, 0.05, None)]
    _, devices, _ = run_coordinator(tmp_path, spec, strategy="krum")
    r1 = dict(get_parameters(load_spec(tmp_path / "run" / "models" / "round-0001.mlmodel")))
    sent = [dict(s.parameters) for d in devices for s in d.submissions if s.round == 1]
    # Krum selects the update closest to the others: the +0.01 one, bit for bit
    matches = [all(np.array_equal(r1[n], s[n]) for n in r1) for s in sent]
    assert sum(matches) == 1


@pytest.mark.parametrize(
    ("strategy", "args"),
    [("fedtrimmedavg", {}), ("fedyogi", {}), ("dp-fixed", {"clipping_norm": 1e6})],
)
def test_more_strategies_complete_with_finite_models(tmp_path, strategy, args):
    spec = [(100, 0.01, None), (300, -0.02, None), (600, 0.05, None)]
    run_coordinator(tmp_path, spec, strategy=strategy, strategy_args=args)
    run = tmp_path / "run"
    r0 = dict(get_parameters(load_spec(run / "models" / "round-0000.mlmodel")))
    r2 = dict(get_parameters(load_spec(run / "final.mlmodel")))
    assert all(np.isfinite(v).all() for v in r2.values())
    assert any(np.any(r2[n] != r0[n]) for n in r0)


def test_fedprox_is_refused_with_the_reason(tmp_path):
    from fedcoreml.server.strategies import StrategyError

    with pytest.raises(StrategyError, match="proximal term"):
        Coordinator(CoordinatorConfig(run_dir=tmp_path, rounds=1, min_devices=1,
                                      strategy="fedprox"))  # fmt: skip


def test_over_selection_closes_the_round_without_the_stragglers(tmp_path):
    config = CoordinatorConfig(
        run_dir=tmp_path / "run", rounds=1, min_devices=5, fraction=0.6, over_selection=1.34,
        round_timeout=30, poll_interval_ms=50,
    )  # fmt: skip
    coordinator = Coordinator(config)
    port = coordinator.start()
    fast = [ScriptedDevice(f"127.0.0.1:{port}", f"fast-{i}", 100 * (i + 1), 0.01 * (i + 1))
            for i in range(3)]  # fmt: skip
    slow = [ScriptedDevice(f"127.0.0.1:{port}", f"slow-{i}", 50, 0.5, delay_s=4.0)
            for i in range(2)]  # fmt: skip
    stop, threads = start_devices(fast + slow)
    started = time.monotonic()
    try:
        coordinator.run()
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while not all(d.refused for d in slow) and time.monotonic() < deadline:
            time.sleep(0.05)  # the stragglers submit late, to a closed round
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        coordinator.stop()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    # the strategy wanted 3 (60 % of 5); 5 were asked; the round closed at 3 reports
    assert line["devices_sampled"] == 5 and line["devices_reported"] == 3
    assert elapsed < 4.0  # it did not wait for the stragglers
    assert all(d.refused and "is closed" in d.refused[0] for d in slow)  # refused, late
    accepted = [s for d in fast for s in d.submissions]
    r1 = dict(get_parameters(load_spec(tmp_path / "run" / "models" / "round-0001.mlmodel")))
    for name, value in weighted_mean(accepted).items():
        np.testing.assert_allclose(r1[name], value, rtol=1e-6, atol=1e-7)


def test_a_round_with_too_few_reports_is_abandoned_and_sent_again(tmp_path):
    spec = [(100, 0.01, None), (300, -0.02, 1), (600, 0.05, 1)]  # two vanish in round 1 ...
    config = CoordinatorConfig(run_dir=tmp_path / "run", rounds=2, min_devices=3, min_reports=2,
                               round_timeout=2, session_ttl=1, poll_interval_ms=50)  # fmt: skip
    coordinator = Coordinator(config)
    port = coordinator.start()
    devices = [ScriptedDevice(f"127.0.0.1:{port}", f"phone-{i}", n, off, die,
                              rejoin_after_s=2.5)  # ... and come back a little later
               for i, (n, off, die) in enumerate(spec)]  # fmt: skip
    stop, threads = start_devices(devices)
    run_to_the_end(coordinator, stop, threads)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["abandoned_attempts"] >= 1
    assert lines[1]["devices_reported"] >= 2
    assert [line["round"] for line in lines] == [0, 1, 2]
