"""FedBuff: asynchronous buffered aggregation on any Flower Grid, through push and pull alone.

Flower's strategies run synchronous rounds (``Strategy.start`` sends, waits, aggregates). FedBuff
(Nguyen et al., AISTATS 2022) keeps ``concurrency`` nodes training on the newest model version
at all times: each reply is taken as a delta against the version it was trained on, and after
every ``buffer_size`` accepted updates their staleness-discounted, examples-weighted mean is
applied as one server step (fedbuff_math.py), giving the next version, which new tasks carry.

Only ``Grid.get_node_ids``, ``push_messages`` and ``pull_messages`` are used, so the same loop
runs over DeviceGrid (phones behind the gateway) and over the Grid Flower's simulation or
deployment runtime hands a ServerApp. A grid that can also close messages (a
:class:`ClosableGrid`, such as DeviceGrid) has the tasks that grew too stale closed at once, so
their devices are refused at submission with the reason; on other grids such replies are dropped
on arrival and counted as refused.

Versions are numbered from the model the loop starts with (0); ``on_version`` is called with each
new version before any message can carry it — the caller commits it there.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcoreml.ios_bridge.echo import shown
from fedcoreml.ios_bridge.flower_messages import NUM_EXAMPLES_KEY, ROUND_KEY
from fedcoreml.server.fedbuff_math import (
    Arrays,
    BufferedUpdate,
    ServerOptimizer,
    ServerState,
    buffer_mean,
    server_step,
    staleness_weight,
)

log = logging.getLogger("fedcoreml.fedbuff")

STALE = "stale"  # the refusal reason of an update past max_staleness
BAD_UPDATE = "bad update"  # a reply whose arrays or examples do not fit the model
FAILURE_REASON_CHARS = 80


@runtime_checkable
class ClosableGrid(Protocol):
    """A grid that can end pushed messages early: their nodes' replies are then refused."""

    def close_messages(self, message_ids: Iterable[str], reason: str) -> None: ...


@dataclass(frozen=True)
class AppliedUpdate:
    """One update as it went into a version: enough to replay the version bit for bit."""

    node_id: int
    base_version: int
    staleness: int
    num_examples: int
    weight: float
    sha256: str  # of the trained arrays as received (see update_digest)
    trained: Arrays = field(repr=False, compare=False)

    def to_json(self, first_version: int = 0) -> dict:
        """The record; ``first_version``: the run's number of the loop's version 0."""
        return {
            "node_id": self.node_id,
            "base_version": self.base_version + first_version,
            "staleness": self.staleness,
            "num_examples": self.num_examples,
            "weight": self.weight,
            "update_sha256": self.sha256,
        }


@dataclass
class VersionRecord:
    """What happened between the previous version and this one."""

    version: int  # counted from the model the loop started with
    applied: list[AppliedUpdate]
    accepted: int = 0  # updates that entered the buffer in this interval
    refused: Counter = field(default_factory=Counter)  # reason -> updates refused
    failed: Counter = field(default_factory=Counter)  # reason -> tasks ended without an update
    handed_out: int = 0  # train tasks pushed in this interval
    seconds: float = 0.0  # wall time since the previous version
    elapsed_s: float = 0.0  # wall time since the loop started

    def summary(self) -> dict:
        """The metrics.jsonl fields of an asynchronous version."""
        staleness = [u.staleness for u in self.applied]
        return {
            "applied": len(self.applied),
            "staleness": staleness,
            "staleness_mean": round(sum(staleness) / len(staleness), 4) if staleness else None,
            "staleness_max": max(staleness, default=None),
            "accepted": self.accepted,
            "refused": dict(sorted(self.refused.items())),
            "failed": dict(sorted(self.failed.items())),
            "handed_out": self.handed_out,
        }


@dataclass(frozen=True)
class _Flight:
    node_id: int
    base_version: int


def update_digest(arrays: Arrays) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class FedBuff:
    """Asynchronous buffered aggregation; :meth:`start` runs it on a Grid."""

    def __init__(
        self,
        concurrency: int = 10,
        buffer_size: int = 5,
        max_staleness: int = 10,
        staleness_exponent: float = 0.5,
        server_optimizer: str = "sgd",
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        min_available_nodes: int = 1,
        poll_interval_s: float = 0.1,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if buffer_size < 1:
            raise ValueError(f"buffer size must be at least 1, got {buffer_size}")
        if max_staleness < 0:
            raise ValueError(f"max staleness must not be negative, got {max_staleness}")
        if not staleness_exponent >= 0:
            raise ValueError(f"staleness exponent must not be negative, got {staleness_exponent}")
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.staleness_exponent = staleness_exponent
        self.optimizer = ServerOptimizer(
            server_optimizer, server_learning_rate, server_momentum, beta_1, beta_2, tau
        )
        self.min_available_nodes = min_available_nodes
        self.poll_interval_s = poll_interval_s

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_versions: int,
        timeout: float,
        train_config: ConfigRecord,
        on_version: Callable[[VersionRecord, ArrayRecord, ServerState], None],
        should_stop: Callable[[], bool] = lambda: False,
        state: ServerState | None = None,
        first_version: int = 0,
    ) -> ArrayRecord:
        """Publish up to ``num_versions`` versions after ``initial_arrays``; returns the last.

        ``timeout`` is each train message's time to live; ``train_config`` goes into every
        train message (with ``server-round`` = base version + 1, as Flower's strategies number
        a round that trains on the previous round's model). ``on_version`` is called with each
        new version's record, arrays and server state before any message carries it;
        ``should_stop`` is asked between steps (e.g. a target accuracy was reached).
        ``first_version``: the run's number of ``initial_arrays`` (a resumed run), for the logs.
        """
        state = state or ServerState()
        loop = _Loop(self, grid, initial_arrays, timeout, train_config, state, first_version)
        return loop.run(num_versions, on_version, should_stop)


class _Loop:
    """One run of FedBuff on a grid: the in-flight tasks, the buffer, the versions kept."""

    def __init__(
        self,
        strategy: FedBuff,
        grid: Grid,
        initial: ArrayRecord,
        timeout: float,
        train_config: ConfigRecord,
        state: ServerState,
        first_version: int,
    ) -> None:
        self.s = strategy
        self.grid = grid
        self.timeout = timeout
        self.train_config = train_config
        self.state = state
        self.version = 0
        arrays = {name: array.numpy() for name, array in initial.items()}
        # versions a task may still be training on: version -> (record sent, arrays)
        self.models: dict[int, tuple[ArrayRecord, Arrays]] = {0: (initial, arrays)}
        self.in_flight: dict[str, _Flight] = {}  # message id -> flight
        self.closed: set[str] = set()  # message ids closed for staleness
        self.buffer: list[AppliedUpdate] = []
        self.start = time.monotonic()
        self.last_version_at = self.start
        self.record = VersionRecord(1, [])
        self.first_version = first_version  # only for the logs: the run's number of version 0

    @property
    def current(self) -> Arrays:
        return self.models[self.version][1]

    def run(
        self,
        num_versions: int,
        on_version: Callable[[VersionRecord, ArrayRecord, ServerState], None],
        should_stop: Callable[[], bool],
    ) -> ArrayRecord:
        self._wait_for_nodes()
        while self.version < num_versions and not should_stop():
            self._fill()
            progressed = self._collect(list(self.in_flight))
            while len(self.buffer) >= self.s.buffer_size and self.version < num_versions:
                self._close_too_stale()
                on_version(*self._apply())
                self._forget_old_versions()
                progressed = True
            if not progressed:
                time.sleep(self.s.poll_interval_s)
        self._end()
        return self.models[self.version][0]

    # -- tasks --------------------------------------------------------------------------------

    def _wait_for_nodes(self) -> None:
        logged = False
        while len(list(self.grid.get_node_ids())) < self.s.min_available_nodes:
            if not logged:
                log.info("waiting for %d node(s) to connect", self.s.min_available_nodes)
                logged = True
            time.sleep(self.s.poll_interval_s)

    def _fill(self) -> None:
        """Hand the newest version to idle nodes until ``concurrency`` are training."""
        free = self.s.concurrency - len(self.in_flight)
        if free <= 0:
            return
        busy = {f.node_id for f in self.in_flight.values()}
        idle = [n for n in self.grid.get_node_ids() if n not in busy]
        if not idle:
            return
        chosen = random.sample(idle, min(free, len(idle)))
        record = self.models[self.version][0]
        config = ConfigRecord({**self.train_config, ROUND_KEY: self.version + 1})
        messages = [
            Message(
                content=RecordDict({"arrays": record, "config": config}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(self.version + 1),
                ttl=self.timeout,
            )
            for node in chosen
        ]
        ids = list(self.grid.push_messages(messages))
        for message_id, node in zip(ids, chosen, strict=True):
            if message_id:  # Flower gives "" for a message it could not push
                self.in_flight[message_id] = _Flight(node, self.version)
                self.record.handed_out += 1

    def _collect(self, message_ids: list[str]) -> bool:
        """Take in the replies to ``message_ids`` that came back; whether any did."""
        if not message_ids:
            return False
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            message_id = reply.metadata.reply_to_message_id
            flight = self.in_flight.pop(message_id, None)
            if flight is not None:
                self._take(message_id, flight, reply)
        return bool(replies)

    def _take(self, message_id: str, flight: _Flight, reply: Message) -> None:
        if reply.has_error():
            if message_id in self.closed:
                self.closed.discard(message_id)
                self.record.refused[STALE] += 1
            else:
                reason = shown(reply.error.reason or "no reply", FAILURE_REASON_CHARS)
                self.record.failed[reason] += 1
            return
        staleness = self.version - flight.base_version
        if staleness > self.s.max_staleness:
            self.record.refused[STALE] += 1
            return
        update = self._update(flight, staleness, reply)
        if update is None:
            self.record.refused[BAD_UPDATE] += 1
            return
        self.buffer.append(update)
        self.record.accepted += 1

    def _update(self, flight: _Flight, staleness: int, reply: Message) -> AppliedUpdate | None:
        base = self.models[flight.base_version][1]
        arrays = next(iter(reply.content.array_records.values()), None)
        metrics = next(iter(reply.content.metric_records.values()), None)
        if arrays is None or metrics is None or set(arrays.keys()) != set(base):
            log.warning("node %d: a reply without the model's arrays; refused", flight.node_id)
            return None
        trained = {name: arrays[name].numpy() for name in base}
        examples = int(metrics.get(NUM_EXAMPLES_KEY, 0))
        if examples < 1 or any(trained[k].shape != base[k].shape for k in base):
            log.warning("node %d: %d examples or arrays of other shapes; refused",
                        flight.node_id, examples)  # fmt: skip
            return None
        return AppliedUpdate(
            node_id=flight.node_id,
            base_version=flight.base_version,
            staleness=staleness,
            num_examples=examples,
            weight=examples * staleness_weight(staleness, self.s.staleness_exponent),
            sha256=update_digest(trained),
            trained=trained,
        )

    def _close_too_stale(self) -> None:
        """Before the next version exists, end the tasks it would make too stale.

        Replies already in are collected first (they arrived in time); the others are closed,
        so the grid refuses their nodes' submissions with the reason.
        """
        limit = self.version + 1 - self.s.max_staleness  # oldest base still acceptable
        doomed = [i for i, f in self.in_flight.items() if f.base_version < limit]
        if not doomed:
            return
        if isinstance(self.grid, ClosableGrid):
            reason = (
                f"too stale: trained on version {{base}}, version {self.version + 1} is out and "
                f"the staleness limit is {self.s.max_staleness}"
            )
            by_base: dict[int, list[str]] = {}
            for message_id in doomed:
                by_base.setdefault(self.in_flight[message_id].base_version, []).append(message_id)
            for base, ids in by_base.items():
                self.grid.close_messages(ids, reason.format(base=base))
            self.closed.update(doomed)
        self._collect(doomed)

    # -- versions -----------------------------------------------------------------------------

    def _apply(self) -> tuple[VersionRecord, ArrayRecord, ServerState]:
        applied = self.buffer[: self.s.buffer_size]
        self.buffer = self.buffer[self.s.buffer_size :]
        deltas = [
            BufferedUpdate(
                str(u.node_id), u.base_version, u.staleness, u.num_examples, u.weight,
                {k: u.trained[k] - self.models[u.base_version][1][k] for k in u.trained},
            )
            for u in applied
        ]  # fmt: skip
        new, self.state = server_step(
            self.current, buffer_mean(deltas), self.s.optimizer, self.state
        )
        # what devices receive is float32 (an adam step computes in float64)
        new = {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}
        self.version += 1
        record = ArrayRecord({k: Array(v) for k, v in new.items()})
        self.models[self.version] = (record, new)
        now = time.monotonic()
        done = self.record
        done.version, done.applied = self.version, applied
        done.seconds, done.elapsed_s = now - self.last_version_at, now - self.start
        self.last_version_at = now
        self.record = VersionRecord(self.version + 1, [])
        log.info(
            "version %d: %d update(s) applied (staleness %s), %d refused, %d failed, %.1f s",
            self.version + self.first_version, len(applied), [u.staleness for u in applied],
            sum(done.refused.values()), sum(done.failed.values()), done.seconds,
        )  # fmt: skip
        return done, record, self.state

    def _forget_old_versions(self) -> None:
        """Drop the arrays of versions no task or buffered update is based on any more."""
        needed = {f.base_version for f in self.in_flight.values()}
        needed |= {u.base_version for u in self.buffer}
        needed.add(self.version)
        for version in [v for v in self.models if v not in needed]:
            del self.models[version]

    def _end(self) -> None:
        """The run is over: tasks still out are closed where the grid can close them."""
        if self.in_flight and isinstance(self.grid, ClosableGrid):
            self.grid.close_messages(list(self.in_flight), "run finished")
        self.in_flight.clear()
