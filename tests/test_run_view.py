"""server/run_view.py on real run directories: finished, still running, only begun, damaged."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from real_runs import scripted_run

from fedcoreml.ios_bridge.mlmodel_io import sha256_hex
from fedcoreml.server.run_dir import RunDirectory, RunDirectoryError
from fedcoreml.server.run_view import read_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return scripted_run(tmp_path_factory.mktemp("view") / "run", rounds=2, devices=2)


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_finished_run_reads_as_its_files_say(finished):
    view = read_run(finished)
    assert view.state == "finished"
    assert dict(view.config) == json.loads((finished / "run.json").read_text())
    assert [m.version for m in view.models] == [0, 1, 2]
    for model in view.models:
        data = model.path.read_bytes()
        assert model.path == RunDirectory(finished).round_model(model.version)
        assert (model.sha256, model.size_bytes) == (sha256_hex(data), len(data))
    lines = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [dict(m.raw) for m in view.metrics] == lines
    assert [m.test_accuracy for m in view.metrics] == [line["test_accuracy"] for line in lines]
    assert [m.devices_reported for m in view.metrics] == [0, 2, 2]
    assert view.final_model.version == 2
    assert view.final_model.sha256 == view.models[-1].sha256 != view.models[0].sha256
    assert view.metrics_for(1).model_sha256 == view.model(1).sha256


def test_the_view_is_frozen(finished):
    view = read_run(finished)
    with pytest.raises(AttributeError):
        view.models = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.config["rounds"] = 99  # type: ignore[index]


def test_a_run_with_only_run_json_is_running_with_nothing_yet(tmp_path):
    RunDirectory(tmp_path / "run").write_config({"run_id": 7, "rounds": 3})
    view = read_run(tmp_path / "run")
    assert (view.state, view.models, view.metrics, view.final_model) == ("running", (), (), None)
    assert view.latest_model is None
    with pytest.raises(RunDirectoryError, match=r"no committed model version 0 \(committed: none"):
        view.model(0)


def test_a_run_read_while_it_goes_on_is_always_consistent(tmp_path):
    run_dir = tmp_path / "run"
    runner = threading.Thread(
        target=scripted_run, args=(run_dir,), kwargs={"rounds": 3, "delay_s": 0.3}
    )
    runner.start()
    views = []
    try:
        while runner.is_alive() or not views or views[-1].state != "finished":
            if (run_dir / "run.json").exists():
                views.append(read_run(run_dir))
            time.sleep(0.01)
            assert len(views) < 100_000
    finally:
        runner.join(timeout=60)
    for view in views:
        versions = [m.version for m in view.models]
        assert versions == list(range(len(versions)))
        assert {m.round for m in view.metrics} <= set(versions)
    running = [v for v in views if v.state == "running" and v.models]
    assert running, "never saw the run while it was going on"
    assert views[-1].state == "finished" and len(views[-1].metrics) == 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.round_model(1).write_bytes(b"bit rot"),
         r"round-0001.mlmodel: sha256 \w+\.\.\. differs"),
        (lambda d: d.round_model(2).unlink(), r"round-0002.mlmodel: missing"),
        (lambda d: d.metrics_file.write_text(d.metrics_file.read_text() + "{torn\n"),
         r"metrics.jsonl: not valid JSON lines"),
        (lambda d: d.final_model.write_bytes(b"another model"),
         r"final.mlmodel: sha256 \w+\.\.\. is not any committed model's"),
        (lambda d: d.config_file.write_text("[1, 2]"), r"run.json: expected a JSON object"),
        (lambda d: d.config_file.unlink(), r"no run.json; not a fedcoreml run directory"),
    ],
    ids=["changed-model", "missing-model", "torn-metrics", "foreign-final", "config-list",
         "no-config"],
)  # fmt: skip
def test_a_damaged_run_is_refused_naming_the_file(finished, tmp_path, damage, message):
    run_dir = copy_run(finished, tmp_path / "run")
    damage(RunDirectory(run_dir))
    with pytest.raises(RunDirectoryError, match=message):
        read_run(run_dir)


def test_a_metrics_field_of_the_wrong_type_is_named(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines[1]["test_accuracy"] = "high"
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RunDirectoryError, match=r"round 1: 'test_accuracy' is not a number"):
        read_run(run_dir)


def test_a_damaged_running_run_is_still_refused_after_the_retries(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "final.mlmodel").unlink()  # running: a read that fails is retried
    RunDirectory(run_dir).round_model(1).write_bytes(b"bit rot")
    started = time.monotonic()
    with pytest.raises(RunDirectoryError, match="differs"):
        read_run(run_dir)
    assert time.monotonic() - started < 5


def test_without_verify_model_files_are_not_hashed_but_must_exist(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    directory = RunDirectory(run_dir)
    directory.round_model(1).write_bytes(b"bit rot")
    assert [m.version for m in read_run(run_dir, verify=False).models] == [0, 1, 2]
    directory.round_model(1).unlink()
    with pytest.raises(RunDirectoryError, match=r"round-0001.mlmodel: missing"):
        read_run(run_dir, verify=False)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(RunDirectoryError, match=r"nowhere: no such run directory"):
        read_run(tmp_path / "nowhere")
