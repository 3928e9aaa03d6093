"""Every mistake on the command line is one line on stderr, exit status 2, and leaves no trace.

The coordinator's errors are checked by calling the command's ``main`` in this process. Errors of
``train``, ``devices`` and ``demo`` must come before TensorFlow is imported (it takes seconds),
so those run in a subprocess under ``python -X importtime``, which lists every module imported:
none of TensorFlow's may be among them (coremltools' probe for ``tensorflow`` itself is blocked,
and listed, without loading anything).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from fedcoreml.server.cli import build_parser, main

# The devices extra not installed: TensorFlow cannot be imported (nor found).
WITHOUT_TENSORFLOW = (
    "import sys; sys.modules['tensorflow'] = None; "
    "from fedcoreml.server.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class Result:
    returncode: int
    stdout: str
    errors: list[str]  # stderr lines, without -X importtime's
    imported: set[str]

    @property
    def loaded_tensorflow(self) -> bool:
        return any(module.startswith("tensorflow.") for module in self.imported)


def fedcoreml(*args: str, cwd: Path | None = None, without_tensorflow: bool = False) -> Result:
    command = (
        [sys.executable, "-c", WITHOUT_TENSORFLOW]
        if without_tensorflow
        else [sys.executable, "-X", "importtime", "-m", "fedcoreml.server.cli"]
    )
    done = subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    errors, imported = [], set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[1].strip())
        elif line.strip():
            errors.append(line)
    return Result(done.returncode, done.stdout, errors, imported)


def assert_refused(result: Result, command: str, *expected: str) -> None:
    assert result.returncode == 2, result
    assert len(result.errors) == 1, result.errors
    line = result.errors[0]
    assert line.startswith(f"fedcoreml {command}: error: "), line
    for part in expected:
        assert part in line, line


def in_process(capsys, *args: str) -> Result:
    """``fedcoreml ARGS`` in this process (its imports are warm): exit status and stderr lines."""
    try:
        returncode = main(list(args))
    except SystemExit as exit_:
        returncode = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return Result(returncode, out, [line for line in err.splitlines() if line.strip()], set())


def test_version(capsys):
    result = in_process(capsys, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fedcoreml {version('fedcoreml')}"


def test_every_option_of_every_command_has_help():
    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                assert helped == set(action.choices), f"{path}: commands without help"
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(walk(build_parser(), "fedcoreml")) == []


SERVER = ["server", "--insecure", "--rounds", "1", "--min-devices", "1"]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:99999", "--listen 127.0.0.1:99999: port 99999 is out of range"),
        ("127.0.0.1:-5", "--listen 127.0.0.1:-5: the port '-5' is not a whole number"),
        ("nohost.invalid:50051", "--listen nohost.invalid:50051: cannot resolve host"),
        ("50051", "--listen 50051: expected HOST:PORT"),
    ],
)
def test_a_bad_listen_address_is_one_line(capsys, tmp_path, listen, expected):
    result = in_process(capsys, *SERVER, "--run-dir", str(tmp_path / "run"), "--listen", listen)
    assert_refused(result, "server", expected)
    assert not (tmp_path / "run").exists()


def test_a_port_in_use_is_named(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = in_process(
            capsys, *SERVER, "--run-dir", str(tmp_path / "run"), "--listen", f"127.0.0.1:{port}"
        )
    assert_refused(result, "server", f"port {port} is already in use")
    assert not (tmp_path / "run").exists()


def test_a_new_run_never_joins_an_old_one(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": 1}))
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    result = in_process(capsys, *SERVER, "--run-dir", str(run_dir), "--listen", "127.0.0.1:0")
    assert_refused(
        result,
        "server",
        f"{run_dir} already holds a run (run.json, metrics.jsonl)",
        f"continue it with --resume {run_dir}, or choose a new --run-dir",
    )
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "run.json"]


def test_a_failed_resume_creates_nothing(capsys, tmp_path):
    absent = tmp_path / "absent"
    result = in_process(capsys, "server", "--resume", str(absent))
    assert_refused(result, "server", "no such run directory")
    assert not absent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(in_process(capsys, "server", "--resume", str(empty)), "server", "no run.json")
    assert list(empty.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["train", "--batch-size", "48"], "batch size 48 is not allowed by the model"),
        (["train", "--epochs", "99"], "epochs=99 is not allowed by the model"),
        (["train", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist: no such file"),
        (["train", "--model", "/nonexistent.mlmodel"], "/nonexistent.mlmodel"),
        (["devices", "--server", "nohost.invalid:1", "--count", "2"], "cannot resolve host"),
        (["devices", "--server", "127.0.0.1:70000", "--count", "2"], "port 70000 is out of range"),
        (["devices", "--server", "127.0.0.1:1", "--count", "0"], "--count must be at least 1"),
        (["devices", "--server", "127.0.0.1:1", "--count", "2", "--limit", "0"], "--limit"),
        (["devices", "--server", "127.0.0.1:1", "--count", "2", "--partition", "halves"],
         "bad partition spec 'halves'"),
        (["devices", "--server", "127.0.0.1:1", "--count", "2", "--data-dir", "/nonexistent"],
         "/nonexistent: no such file"),
        (["devices", "--server", "127.0.0.1:1", "--count", "2", "--ca-cert", "/nonexistent.pem"],
         "/nonexistent.pem"),
        (["devices", "--server", "127.0.0.1:1", "--count", "2", "--device-prefix", "a b"],
         "--device-prefix 'a b'"),
        (["demo", "--devices", "0"], "--devices must be at least 1, got 0"),
        (["demo", "--limit", "-3"], "--limit must be at least 1, got -3"),
        (["demo", "--batch-size", "48"], "batch size 48 is not allowed by the model"),
        (["demo", "--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["demo", "--data-dir", "/nonexistent"], "/nonexistent: no such file"),
    ],
)  # fmt: skip
def test_argument_errors_come_before_tensorflow(tmp_path, args, expected):
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "out.mlmodel")]
    if args[0] == "demo":
        args = [*args, "--run-dir", str(tmp_path / "demo")]
    result = fedcoreml(*args, cwd=tmp_path)
    assert_refused(result, args[0], expected)
    assert not result.loaded_tensorflow
    assert list(tmp_path.iterdir()) == [], "a refused command leaves nothing behind"


@pytest.mark.slow
def test_train_refuses_a_directory_as_out(tmp_path):
    result = fedcoreml("train", "--out", str(tmp_path))
    assert_refused(result, "train", f"--out {tmp_path}: is a directory")
    assert not result.loaded_tensorflow


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["devices", "--server", "127.0.0.1:50051", "--count", "2"],
        ["train", "--out", "x.mlmodel"],
        ["demo", "--run-dir", "demo"],
    ],
)
def test_without_the_devices_extra_the_command_says_which_to_install(tmp_path, args):
    result = fedcoreml(*args, cwd=tmp_path, without_tensorflow=True)
    assert result.returncode == 2 and result.errors == [
        f'fedcoreml {args[0]}: error: needs the devices extra: pip install "fedcoreml[devices]"'
    ]
    assert list(tmp_path.iterdir()) == []
