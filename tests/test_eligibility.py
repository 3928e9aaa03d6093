"""Device eligibility (--require-charging, --require-unmetered, --min-battery): the rule, the
gateway's answers to an ineligible device, its absence from the sampled nodes, the options."""

from __future__ import annotations

import math

import pytest
from live_gateway import SPEC, Gateway
from test_cli_errors import SERVER, assert_refused, in_process

from fedcoreml.ios_bridge.mlmodel_io import spec_to_bytes
from fedcoreml.ios_bridge.wire import device_pb2
from fedcoreml.server.gateway.eligibility import Capabilities, EligibilityRule
from fedcoreml.server.gateway.task_board import RoundModel, TaskConfig
from fedcoreml.server.run_config import CoordinatorConfig, CoordinatorConfigError, check_config

MODEL = RoundModel.from_bytes(0, spec_to_bytes(SPEC))
CONFIG = TaskConfig(epochs=1, batch_size=8, learning_rate=0.01)
STRICT = EligibilityRule(require_charging=True, require_unmetered=True, min_battery=0.5)


def caps(charging=True, unmetered=True, battery=0.9) -> Capabilities:
    return Capabilities(charging, unmetered, battery)


def wire(charging=True, unmetered=True, battery=0.9) -> device_pb2.DeviceCapabilities:
    return device_pb2.DeviceCapabilities(
        charging=charging, unmetered_network=unmetered, battery_level=battery
    )


# -- the rule -----------------------------------------------------------------------------------


def test_no_requirement_admits_every_device_even_one_that_reported_nothing():
    rule = EligibilityRule()
    assert rule.check(None) is None
    assert rule.check(caps(False, False, None)) is None


@pytest.mark.parametrize(
    ("capabilities", "reason"),
    [
        (caps(), None),
        (caps(battery=0.5), None),  # the minimum itself is enough
        (caps(charging=False), "not eligible: not charging"),
        (caps(unmetered=False), "not eligible: not on an unmetered network"),
        (caps(battery=0.15), "not eligible: battery 0.15 below 0.50"),
        (caps(battery=None), "not eligible: battery level unknown"),
        (
            caps(False, False, 0.15),
            "not eligible: not charging, not on an unmetered network, battery 0.15 below 0.50",
        ),
        (None, "not eligible: capabilities not reported"),
    ],
)
def test_the_rule_names_everything_missing(capabilities, reason):
    assert STRICT.check(capabilities) == reason


def test_each_requirement_alone_checks_only_itself():
    assert EligibilityRule(require_charging=True).check(caps(True, False, None)) is None
    assert EligibilityRule(require_unmetered=True).check(caps(False, True, None)) is None
    # min_battery 0 still asks for a known level
    assert EligibilityRule(min_battery=0.0).check(caps(False, False, 0.0)) is None
    assert EligibilityRule(min_battery=0.0).check(caps(True, True, None)) == (
        "not eligible: battery level unknown"
    )


@pytest.mark.parametrize(
    ("level", "expected"), [(-1.0, None), (math.nan, None), (1.5, None), (0.7, 0.7), (0.0, 0.0)]
)
def test_a_reported_level_is_read_from_float32_or_taken_as_unknown(level, expected):
    assert Capabilities.of(wire(battery=level)).battery_level == expected
    # a phone at 70 % with --min-battery 0.7 is eligible despite float32 rounding
    assert EligibilityRule(min_battery=0.7).check(Capabilities.of(wire(battery=0.7))) is None


@pytest.mark.parametrize("level", [-0.1, 1.01, math.nan])
def test_the_rule_refuses_a_minimum_outside_0_1(level):
    with pytest.raises(ValueError, match="min_battery must lie in"):
        EligibilityRule(min_battery=level)


# -- the live gateway ---------------------------------------------------------------------------


@pytest.fixture
def gw():
    gateway = Gateway(long_poll_ms=0)
    gateway.registry.eligibility = STRICT
    yield gateway
    gateway.close()


def register(gw: Gateway, device_id: str, capabilities=None) -> tuple[str, int]:
    request = device_pb2.RegisterRequest(device_id=device_id, capabilities=capabilities)
    session = gw.stub.Register(request).session_id
    return session, gw.registry.touch(session).node_id


def test_an_ineligible_device_waits_with_the_reason_and_is_not_sampled(gw):
    session, node = register(gw, "phone-a", wire(charging=False, battery=0.15))
    _, other_node = register(gw, "phone-b", wire())
    assert gw.registry.live_node_ids() == [other_node]
    assert set(gw.registry.live_node_ids(eligible_only=False)) == {node, other_node}

    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.WhichOneof("task") == "wait"
    assert reply.wait.reason == "not eligible: not charging, battery 0.15 below 0.50"
    assert reply.wait.retry_after_ms == gw.service.poll_interval_ms

    # Plugged in and charged: the next GetTask reports it, and the task is handed out.
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session, capabilities=wire()))
    assert reply.WhichOneof("task") == "train" and reply.train.task_id == task.task_id
    assert sorted(gw.registry.live_node_ids()) == sorted([node, other_node])


def test_a_gettask_without_capabilities_keeps_the_last_report(gw):
    session, _ = register(gw, "phone-a", wire(unmetered=False))
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.wait.reason == "not eligible: not on an unmetered network"
    assert gw.registry.live_node_ids() == []


def test_a_device_that_never_reports_is_not_eligible_under_a_rule(gw):
    session, _ = register(gw, "silent")
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.wait.reason == "not eligible: capabilities not reported"
    assert gw.registry.live_node_ids() == []


def test_a_task_handed_out_stays_the_devices_when_it_becomes_ineligible(gw):
    session, node = register(gw, "phone-a", wire())
    task = gw.board.assign(node, "train", 1, MODEL, CONFIG, 30)
    reply = gw.stub.GetTask(device_pb2.GetTaskRequest(session_id=session))
    assert reply.train.task_id == task.task_id
    # Unplugged mid-task: no new task is handed out, but the one it has is still its own.
    reply = gw.stub.GetTask(
        device_pb2.GetTaskRequest(session_id=session, capabilities=wire(charging=False))
    )
    assert reply.wait.reason == "not eligible: not charging"
    chunks = list(
        gw.stub.DownloadModel(
            device_pb2.DownloadModelRequest(session_id=session, task_id=task.task_id)
        )
    )
    assert b"".join(c.data for c in chunks) == MODEL.data
    assert task.status == "pending"


# -- the options --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["-0.1", "1.5", "nan"])
def test_the_cli_refuses_a_min_battery_out_of_range(capsys, tmp_path, level):
    run_dir = tmp_path / "run"
    result = in_process(capsys, *SERVER, "--run-dir", str(run_dir), "--min-battery", level)
    assert_refused(result, "server", "--min-battery must lie in [0, 1]", level)
    assert not run_dir.exists()


def test_the_options_are_checked_and_kept_in_run_json(tmp_path):
    config = CoordinatorConfig(
        run_dir=tmp_path,
        rounds=1,
        min_devices=1,
        require_charging=True,
        require_unmetered=True,
        min_battery=0.4,
    )
    check_config(config)
    again = CoordinatorConfig.from_json(config.to_json())
    assert (again.require_charging, again.require_unmetered, again.min_battery) == (
        True,
        True,
        0.4,
    )
    # a run.json written before these options resumes with no requirement
    old = {k: v for k, v in config.to_json().items() if k not in ("require_charging",
           "require_unmetered", "min_battery")}  # fmt: skip
    assert CoordinatorConfig.from_json(old).min_battery is None
    with pytest.raises(CoordinatorConfigError, match=r"--min-battery must lie in \[0, 1\], got 2"):
        check_config(CoordinatorConfig(run_dir=tmp_path, rounds=1, min_devices=1, min_battery=2))


def test_the_coordinator_applies_the_rule_it_was_configured_with(tmp_path):
    from fedcoreml.server.coordinator import Coordinator

    config = CoordinatorConfig(
        run_dir=tmp_path / "run", rounds=1, min_devices=1, require_charging=True, min_battery=0.3
    )
    coordinator = Coordinator(config)
    assert coordinator.registry.eligibility == EligibilityRule(
        require_charging=True, require_unmetered=False, min_battery=0.3
    )
