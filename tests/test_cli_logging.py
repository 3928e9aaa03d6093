"""Logging options of server, devices and demo: levels, Flower's lines in our format, no chatter."""

from __future__ import annotations

import argparse
import logging

import pytest

from fedcoreml.ios_bridge.cli_logging import (
    RepeatFilter,
    add_logging_options,
    configure_logging,
)


@pytest.fixture
def restore_logging():
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    saved = (root.handlers[:], root.level, flower.handlers[:], flower.filters[:], flower.level)
    propagate = flower.propagate
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    flower.handlers[:], flower.filters[:], flower.level = saved[2], saved[3], saved[4]
    flower.propagate = propagate
    logging.getLogger("fedcoreml").setLevel(logging.NOTSET)


def parse(*argv: str, default: str = "info") -> str:
    parser = argparse.ArgumentParser()
    add_logging_options(parser, default=default)
    return parser.parse_args(list(argv)).log_level


def test_log_level_options():
    assert parse() == "info" and parse(default="warning") == "warning"
    assert parse("--log-level", "warning") == "warning"
    assert parse("-v") == "debug" and parse("-q") == "error"
    with pytest.raises(SystemExit):
        parse("-v", "-q")
    with pytest.raises(SystemExit):
        parse("--log-level", "chatty")


def record(name: str, message: str, *args, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_a_line_repeated_back_to_back_is_printed_once():
    keep = RepeatFilter()
    waiting = "Waiting for nodes to connect: %d connected (minimum required: %d)."
    passed = [
        keep.filter(record("flwr", waiting, 0, 2)),
        keep.filter(record("fedcoreml.coordinator", "round 0: test accuracy 0.1280")),
        keep.filter(record("flwr", waiting, 0, 2)),  # the same as flwr's last line
        keep.filter(record("flwr", waiting, 1, 2)),  # news: a device connected
        keep.filter(record("flwr", waiting, 1, 2, level=logging.WARNING)),
    ]
    assert passed == [True, True, False, True, True]


def test_flower_logs_through_our_handler_without_colour(capsys, restore_logging):
    configure_logging("info", flower=True)
    flower = logging.getLogger("flwr")
    assert flower.propagate and not flower.handlers
    for _ in range(3):
        flower.info("Waiting for nodes to connect: 0 connected (minimum required: 1).")
    logging.getLogger("fedcoreml.coordinator").debug("not at info")
    logging.getLogger("some.library").info("third-party libraries log warnings and up")
    flower.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
    err = capsys.readouterr().err
    assert "\x1b[" not in err
    assert err.count("Waiting for nodes") == 1
    assert " INFO flwr: Waiting for nodes to connect" in err
    assert "not at info" not in err and "third-party" not in err
    assert "fraction_evaluate" not in err  # fedcoreml's default, not news


def test_debug_reaches_our_loggers(capsys, restore_logging):
    configure_logging("debug")
    logging.getLogger("fedcoreml.device").debug("poll")
    assert "DEBUG fedcoreml.device: poll" in capsys.readouterr().err
    configure_logging("error")
    logging.getLogger("fedcoreml.device").warning("quiet")
    assert "quiet" not in capsys.readouterr().err
