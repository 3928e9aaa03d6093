"""A fleet of recording devices for the crash-point tests, run as its own process.

    python tests/crash_fleet.py HOST:PORT OUT_DIR [--count N]

Each device is the reference DeviceClient, retrying briskly while the coordinator is down, with
a trainer that returns the received parameters plus its own offset plus noise seeded by the
task id (so a round that is run again yields another model). Everything a test needs to judge a
run that was killed and resumed is appended to ``OUT_DIR/events.jsonl`` as it happens, each
event with its ``time.monotonic()`` (one clock for every process on the machine):

- ``model``: a GetTask answer that named a model (train, evaluate or finished): version, sha256;
- ``accepted``: an update the coordinator accepted: round, task, examples; its tensors are in
  ``OUT_DIR/updates/<task_id>.npz``;
- ``done``: the device's end: finished or not, registrations, error.

Exits 0 when every device heard that the run finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from fedcoreml.ios_bridge.channel import open_channel
from fedcoreml.ios_bridge.device_client import (
    DeviceClient,
    EvaluationResult,
    RetryPolicy,
    TrainResult,
)
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import get_parameters
from fedcoreml.ios_bridge.wire import device_pb2

# The coordinator is killed and restarted under the devices: retry often, for long enough.
RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=0.3, give_up_after=90.0, rpc_timeout=30.0)


class Recorder:
    """Appends events to one JSON-lines file, flushed line by line, from any thread."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "updates").mkdir(parents=True, exist_ok=True)
        self._file = (out / "events.jsonl").open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def event(self, device_id: str, event: str, **fields) -> None:
        line = {"time": time.monotonic(), "device": device_id, "event": event, **fields}
        with self._lock:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class OffsetTrainer:
    def __init__(self, offset: float, num_examples: int) -> None:
        self.offset = np.float32(offset)
        self.num_examples = num_examples

    def train(self, model: bytes, task: device_pb2.TrainTask) -> TrainResult:
        rng = np.random.default_rng(zlib.crc32(task.task_id.encode()))
        sent = []
        for name, value in get_parameters(spec_from_bytes(model)):
            noise = 0.01 * rng.standard_normal(value.shape)
            sent.append((name, (value + self.offset + noise).astype(np.float32)))
        return TrainResult(sent, self.num_examples, 0.5, 0.5, 0.01)

    def evaluate(self, model: bytes, task: device_pb2.EvaluateTask) -> EvaluationResult:
        return EvaluationResult(self.num_examples, 0.3, 0.8)


class RecordingClient(DeviceClient):
    """DeviceClient that records every model it is told of and every update accepted."""

    def __init__(self, channel, device_id: str, trainer, recorder: Recorder) -> None:
        super().__init__(channel, device_id, trainer, platform="crash-test", retry=RETRY)
        self.recorder = recorder

    def next_task(self) -> device_pb2.GetTaskResponse:
        response = super().next_task()
        kind = response.WhichOneof("task")
        if kind in ("train", "evaluate"):
            task = getattr(response, kind)
            self._model(kind, task.model, round=task.round, task=task.task_id)
        elif kind == "finished" and response.finished.HasField("final_model"):
            self._model(kind, response.finished.final_model)
        return response

    def _model(self, kind: str, ref: device_pb2.ModelRef, **fields) -> None:
        self.recorder.event(
            self.device_id, "model", kind=kind, version=ref.version, sha256=ref.sha256, **fields
        )

    def submit_update(self, task_id, result, chunk_bytes=None):
        response = super().submit_update(task_id, result, chunk_bytes)
        np.savez(self.recorder.out / "updates" / f"{task_id}.npz", **dict(result.parameters))
        self.recorder.event(
            self.device_id, "accepted", round=response.round, task=task_id,
            num_examples=result.num_examples,
        )  # fmt: skip
        return response


def run_device(address: str, index: int, recorder: Recorder, results: list[bool]) -> None:
    device_id = f"crash-{index}"
    client = None
    try:
        with open_channel(address) as channel:
            trainer = OffsetTrainer(offset=0.01 * (index + 1), num_examples=100 * (index + 1))
            client = RecordingClient(channel, device_id, trainer, recorder)
            client.run()
    except Exception as exc:  # recorded below; the exit status says it failed
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    stats = client.stats if client is not None else None
    finished = bool(stats and stats.finished)
    results[index] = finished
    recorder.event(
        device_id, "done", finished=finished, error=error,
        registrations=stats.registrations if stats else 0,
        failures=stats.failures if stats else 0,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=3)
    args = parser.parse_args(argv)
    recorder = Recorder(args.out)
    results = [False] * args.count
    threads = [
        threading.Thread(target=run_device, args=(args.address, i, recorder, results))
        for i in range(args.count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
