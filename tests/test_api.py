"""The embedding API (server/api.py) used as the README shows: run, read, predict."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from protocol_devices import ScriptedDevice, start_devices
from real_runs import scripted_config

from fedcoreml.server import api


def test_an_application_runs_a_coordinator_reads_the_run_and_predicts(tmp_path):
    rounds_seen = []
    config = scripted_config(tmp_path / "app", rounds=2, min_devices=2)
    with api.coordinator(config, on_round=rounds_seen.append) as running:
        port = running.port
        phones = [ScriptedDevice(f"127.0.0.1:{port}", f"app-{i}", 50, 0.001) for i in range(2)]
        stop, threads = start_devices(phones)
        try:
            deadline = time.monotonic() + 30
            while len(running.registry.live_node_ids()) < 2:
                assert time.monotonic() < deadline, "the devices did not register"
                time.sleep(0.02)
            final = running.run()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    with pytest.raises(OSError):  # the block stopped it: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    assert [r.round for r in rounds_seen] == [0, 1, 2]
    view = api.read_run(tmp_path / "app")
    assert view.state == "finished" and view.final_model.path == final
    assert [m.test_accuracy for m in view.metrics] == [r.test_accuracy for r in rounds_seen]

    digit = np.zeros((28, 28), np.float32)
    digit[6:22, 13:15] = 1.0  # a "1"
    answer = api.predict(view.latest_model.path, digit)
    again = api.Predictor(final).predict(digit)
    assert answer.probabilities == again.probabilities
    assert answer.label == max(answer.probabilities, key=answer.probabilities.get)
    assert abs(sum(answer.probabilities.values()) - 1) < 1e-5


def test_every_exported_name_is_there():
    assert all(getattr(api, name) is not None for name in api.__all__)
    assert issubclass(api.RunDirectoryError, api.FedCoreMLError)
    assert issubclass(api.NotADigitModelError, api.FedCoreMLError)
