"""Availability profiles for simulated devices: the timelines, DeviceClient reporting a
provider's capabilities on every call, and a gateway that makes a device wait until it charges.

No TensorFlow: the profiles are pure Python, the clients run against the fake coordinator or
the real gateway with a trainer that is never called.
"""

from __future__ import annotations

import threading

import pytest
from fake_coordinator import FakeCoordinator, serve, wait
from live_gateway import SPEC, Gateway
from test_cli_errors import assert_refused, in_process

from fedcoreml.client_sim.availability import (
    PRESETS,
    AvailabilityError,
    AvailabilityProfile,
    preset,
)
from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.device_client import DeviceClient, RetryPolicy
from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.server.gateway.eligibility import EligibilityRule
from fedcoreml.server.gateway.task_board import RoundModel, TaskConfig

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=5.0, rpc_timeout=20.0)
PHONES = PRESETS["phones"]
HOUR = [float(t) for t in range(0, 3600, 5)]


def caps(charging: bool, battery: float = 0.5) -> device_pb2.DeviceCapabilities:
    return device_pb2.DeviceCapabilities(
        charging=charging, unmetered_network=True, battery_level=battery
    )


# -- the profiles -------------------------------------------------------------------------------


def test_a_profile_is_the_same_timeline_for_the_same_seed_and_another_for_another():
    a, again, other = PHONES.for_device(7), preset("phones", 7), PHONES.for_device(8)
    assert [a.capabilities(t) for t in HOUR] == [again.capabilities(t) for t in HOUR]
    assert [a.capabilities(t) for t in HOUR] != [other.capabilities(t) for t in HOUR]


def test_always_is_charging_unmetered_and_full_at_every_time():
    always = preset("always", 3)
    assert all(always.capabilities(t) == caps(True, 1.0) for t in HOUR)


def test_phones_charge_about_40_percent_of_the_time_in_windows_of_30_to_120_s():
    devices = [PHONES.for_device(seed) for seed in range(50)]
    # At any moment roughly 40 % of the fleet is charging (and ~70 % is unmetered).
    for t in (0.0, 600.0, 1800.0):
        charging = sum(d.charging(t) for d in devices) / len(devices)
        unmetered = sum(d.unmetered(t) for d in devices) / len(devices)
        assert 0.2 <= charging <= 0.6, (t, charging)
        assert 0.5 <= unmetered <= 0.9, (t, unmetered)
    # Every charging window that starts and ends within the hour lasts 30-120 s (1 s grid).
    grid = [float(t) for t in range(3600)]
    for device in devices[:10]:
        states = [device.charging(t) for t in grid]
        starts = [i for i in range(1, len(grid)) if states[i] and not states[i - 1]]
        ends = [i for i in range(1, len(grid)) if not states[i] and states[i - 1]]
        windows = [
            end - start
            for start in starts
            if (end := next((e for e in ends if e > start), None)) is not None
        ]
        assert windows, device.seed
        assert all(29 <= window <= 121 for window in windows), (device.seed, windows)


def test_the_battery_stays_in_0_1_rises_while_charging_and_falls_otherwise():
    for seed in range(20):
        device = PHONES.for_device(seed)
        levels = [device.battery(t) for t in HOUR]
        assert all(0.0 <= level <= 1.0 for level in levels)
        for t0, t1, l0, l1 in zip(HOUR, HOUR[1:], levels, levels[1:], strict=False):
            # within one charging state the level moves one way only
            if device.charging(t0) and device.charging(t1) and device.charging((t0 + t1) / 2):
                assert l1 >= l0
            if not (device.charging(t0) or device.charging(t1) or device.charging((t0 + t1) / 2)):
                assert l1 <= l0
    # A long time off the charger empties the battery, and it never goes below 0.
    flat = AvailabilityProfile("flat", 0.0, (1, 1), 1.0, (1, 1), 0.005, 0.01, (0.5, 0.5))
    assert flat.battery(50.0) == pytest.approx(0.25)
    assert flat.battery(1000.0) == 0.0
    full = AvailabilityProfile("full", 1.0, (1, 1), 1.0, (1, 1), 0.005, 0.01, (0.5, 0.5))
    assert full.battery(20.0) == pytest.approx(0.7) and full.battery(100.0) == 1.0


def test_the_provider_counts_time_from_its_start():
    now = [100.0]
    flat = AvailabilityProfile("flat", 0.0, (1, 1), 1.0, (1, 1), 0.01, 0.0, (1.0, 1.0))
    provider = flat.provider(clock=lambda: now[0])
    assert provider().battery_level == pytest.approx(1.0)
    now[0] = 130.0
    assert provider().battery_level == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: preset("weekend"), "unknown availability profile 'weekend'; choose one of"),
        (lambda: AvailabilityProfile("x", 1.5, (1, 2), 1, (1, 2), 0, 0, (1, 1)), "charging_share"),
        (lambda: AvailabilityProfile("x", 0.5, (0, 2), 1, (1, 2), 0, 0, (1, 1)), "charging_window"),
        (
            lambda: AvailabilityProfile("x", 0.5, (1, 2), 1, (1, 2), 0, 0, (0.5, 2)),
            "initial_battery",
        ),
    ],
)
def test_a_bad_profile_is_refused_with_what_is_wrong(build, message):
    with pytest.raises(AvailabilityError, match=message):
        build()


def test_the_devices_command_refuses_an_unknown_profile_before_loading_anything(capsys):
    result = in_process(
        capsys, "devices", "--server", "127.0.0.1:1", "--count", "2", "--availability", "beach"
    )
    assert_refused(result, "devices", "--availability", "'beach'", "always, phones")


# -- DeviceClient reports the provider's answer ----------------------------------------------------


class Unplugged:
    """Reports not charging for the first ``calls`` answers, charging after; counts the calls."""

    def __init__(self, calls: int) -> None:
        self.calls = 0
        self.until = calls

    def __call__(self) -> device_pb2.DeviceCapabilities:
        self.calls += 1
        return caps(self.calls > self.until, battery=self.calls / 10)


def test_device_client_sends_the_providers_current_capabilities_on_register_and_each_gettask():
    fake = FakeCoordinator([wait(10), wait(10), wait(10)], {})
    provider = Unplugged(calls=2)
    stop = threading.Event()
    watchdog = threading.Timer(60, stop.set)
    watchdog.start()
    try:
        with serve(fake) as address, open_channel(address) as channel:
            DeviceClient(channel, "phone-1", None, capabilities_provider=provider, retry=FAST,
                         stop=stop).run()  # fmt: skip
    finally:
        watchdog.cancel()
    assert fake.registrations[0].capabilities == caps(False, 0.1)
    # three waits, then "finished": four GetTask calls, each with a fresh answer
    assert fake.get_task_capabilities == [
        caps(False, 0.2), caps(True, 0.3), caps(True, 0.4), caps(True, 0.5)
    ]  # fmt: skip


def test_device_client_without_a_provider_still_reports_charging_unmetered_full():
    fake = FakeCoordinator([], {})
    with serve(fake) as address, open_channel(address) as channel:
        DeviceClient(channel, "phone-1", None, retry=FAST).run()
    assert fake.registrations[0].capabilities == caps(True, 1.0)
    assert fake.get_task_capabilities == [caps(True, 1.0)]


# -- the real gateway with --require-charging ------------------------------------------------------


def test_a_device_waits_until_its_provider_says_charging_then_gets_its_task():
    gateway = Gateway(long_poll_ms=0)
    gateway.registry.eligibility = EligibilityRule(require_charging=True)
    try:
        with open_channel(f"127.0.0.1:{gateway.port}") as channel:
            client = DeviceClient(channel, "phone-1", None, capabilities_provider=Unplugged(2),
                                  retry=FAST)  # fmt: skip
            client.register()  # not charging
            node = gateway.registry.touch(client.session_id).node_id
            assert gateway.registry.live_node_ids() == []  # not sampled while unplugged
            task = gateway.board.assign(
                node, "train", 1, RoundModel.from_bytes(0, spec_to_bytes(SPEC)),
                TaskConfig(epochs=1, batch_size=8, learning_rate=0.01), 30,
            )  # fmt: skip
            first = client.get_task()  # still not charging
            assert first.WhichOneof("task") == "wait"
            assert first.wait.reason == "not eligible: not charging"
            second = client.get_task()  # plugged in
            assert second.WhichOneof("task") == "train"
            assert second.train.task_id == task.task_id
            assert gateway.registry.live_node_ids() == [node]
    finally:
        gateway.close()
