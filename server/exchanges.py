"""What each round's exchange with the devices (or Flower nodes) yielded, on any Grid.

DeviceGrid records an :class:`ExchangeStats` for every ``send_and_receive`` it runs; for any
other Grid (the one Flower's runtime hands a ServerApp), :class:`RecordingGrid` wraps it and
records the same, so the run directory's metrics mean the same thing on both.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcoreml.ios_bridge.atomic_file import write_bytes_atomic
from fedcoreml.ios_bridge.flower_messages import ACCURACY_KEY, NUM_EXAMPLES_KEY, ROUND_KEY


@dataclass
class ExchangeStats:
    """One send_and_receive: what was asked of how many devices and what came back."""

    kind: str
    round: int
    started_at: float = 0.0  # time.time() when the tasks were sent
    sampled: int = 0
    reported: int = 0
    failed: int = 0
    examples: int = 0
    accuracy: float | None = None  # examples-weighted mean of what the devices reported
    seconds: float = 0.0
    abandoned: int = 0  # attempts abandoned for too few reports before this one

    def count(self, replies: Iterable[Message]) -> None:
        """Add the replies' outcomes: errors are failures, the others report their examples."""
        weighted_accuracy = 0.0 if self.accuracy is None else self.accuracy * self.examples
        for reply in replies:
            if reply.has_error():
                self.failed += 1
                continue
            metrics = next(iter(reply.content.metric_records.values()), None)
            self.reported += 1
            if metrics is None:
                continue
            examples = int(metrics.get(NUM_EXAMPLES_KEY, 0))
            self.examples += examples
            weighted_accuracy += float(metrics.get(ACCURACY_KEY, 0.0)) * examples
        if self.examples:
            self.accuracy = weighted_accuracy / self.examples


def message_round(message: Message) -> int:
    config = next(iter(message.content.config_records.values()), None)
    return int(config.get(ROUND_KEY, 0) if config is not None else 0)


def message_kind(message: Message) -> str:
    return "train" if message.metadata.message_type == MessageType.TRAIN else "evaluate"


class RecordingGrid(Grid):
    """Any Grid, with an :class:`ExchangeStats` recorded for each ``send_and_receive``.

    With ``keep_dir``, every update a node returns is also kept, as it arrived, in
    ``keep_dir/round-NNNN/node-<id>.npz`` (its arrays and ``num-examples``): an audit trail
    of what each round aggregated.
    """

    def __init__(self, grid: Grid, keep_dir: Path | None = None) -> None:
        self.grid = grid
        self.keep_dir = keep_dir
        self.history: list[ExchangeStats] = []

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        stats = ExchangeStats(
            kind=message_kind(messages[0]),
            round=message_round(messages[0]),
            started_at=time.time(),
            sampled=len(messages),
        )
        start = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stats.seconds = time.monotonic() - start
        stats.count(replies)
        stats.failed += max(len(messages) - len(replies), 0)  # no reply at all within timeout
        self.history.append(stats)
        if self.keep_dir is not None and stats.kind == "train":
            self._keep(stats.round, replies)
        return replies

    def _keep(self, server_round: int, replies: list[Message]) -> None:
        folder = self.keep_dir / f"round-{server_round:04d}"
        for reply in replies:
            if reply.has_error() or not reply.content.array_records:
                continue
            arrays = next(iter(reply.content.array_records.values()))
            metrics = next(iter(reply.content.metric_records.values()))
            buffer = io.BytesIO()
            np.savez(
                buffer,
                **{name: array.numpy() for name, array in arrays.items()},
                **{NUM_EXAMPLES_KEY: np.int64(metrics[NUM_EXAMPLES_KEY])},
            )
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(folder / f"node-{reply.metadata.src_node_id}.npz", buffer.getvalue())
