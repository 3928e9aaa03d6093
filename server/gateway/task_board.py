"""The task board: what the coordinator asked of which device, and what came back.

The coordinator (through DeviceGrid) assigns tasks and waits for them; the gRPC service hands
them to devices and records their results after validation. A task ends exactly once: submitted,
or failed (deadline passed, device gone, round closed). A result for an ended task is refused,
so a late or repeated submission can never reach an aggregate.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from fedcoreml.ios_bridge.echo import shown
from fedcoreml.server.gateway.refusals import (
    EVALUATION_FOR_TRAIN_TASK,
    TASK_CLOSED,
    TASK_OF_OTHER_DEVICE,
    TASK_SUBMITTED,
    UNKNOWN_TASK,
    UPDATE_FOR_EVALUATE_TASK,
)

TaskKind = Literal["train", "evaluate"]
CLOSED_TASKS_KEPT = 100_000
TaskStatus = Literal["pending", "submitted", "failed"]


@dataclass(frozen=True)
class RoundModel:
    """One global model as devices download it: the exact .mlmodel bytes, built once."""

    version: int
    data: bytes
    sha256: str

    @classmethod
    def from_bytes(cls, version: int, data: bytes) -> RoundModel:
        return cls(version, data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class TaskConfig:
    epochs: int
    batch_size: int
    learning_rate: float


@dataclass(frozen=True)
class UpdateResult:
    parameters: list[tuple[str, np.ndarray]]
    num_examples: int
    loss: float
    accuracy: float
    train_seconds: float


@dataclass(frozen=True)
class EvaluationResult:
    num_examples: int
    loss: float
    accuracy: float


class UpdateAggregator(Protocol):
    """Folds a train task's update in as it is accepted, so the board need not keep its tensors.

    ``reserve`` is called under the board's lock the moment the update is accepted (so nothing
    is counted twice or missed), ``add`` right after, outside the lock; ``add`` releases the
    reservation whether or not it succeeds.
    """

    def reserve(self) -> None: ...

    def add(self, result: UpdateResult) -> None: ...


@dataclass
class Task:
    task_id: str
    node_id: int
    kind: TaskKind
    round: int
    model: RoundModel
    config: TaskConfig | None
    deadline: float  # monotonic
    status: TaskStatus = "pending"
    failure: str = ""
    result: UpdateResult | EvaluationResult | None = None
    # the aggregator an accepted update is folded into; ``result`` then keeps no tensors
    aggregator: UpdateAggregator | None = None
    handout_at: float | None = None  # monotonic time from which the device may be given it


class TaskBoard:
    """Thread-safe record of tasks; ``wait`` blocks the coordinator until they end."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._tasks: dict[str, Task] = {}
        self._by_node: dict[int, dict[str, Task]] = {}  # the same tasks, oldest first per node
        # Ended tasks already handed to the coordinator, kept (bounded) so that a late or
        # repeated submission is told its round is closed rather than "unknown task".
        self._closed: OrderedDict[str, tuple[int, int, TaskStatus, str]] = OrderedDict()
        self._finished_model: RoundModel | None = None
        self._finished_reason = ""
        self._told_finished: set[int] = set()

    # -- coordinator side ---------------------------------------------------------------------

    def assign(
        self,
        node_id: int,
        kind: TaskKind,
        round_number: int,
        model: RoundModel,
        config: TaskConfig | None,
        timeout_s: float,
        aggregator: UpdateAggregator | None = None,
    ) -> Task:
        task = Task(
            task_id=secrets.token_hex(12),
            node_id=node_id,
            kind=kind,
            round=round_number,
            model=model,
            config=config,
            deadline=self._clock() + timeout_s,
            aggregator=aggregator if kind == "train" else None,
        )
        with self._cond:
            self._tasks[task.task_id] = task
            self._by_node.setdefault(node_id, {})[task.task_id] = task
            self._cond.notify_all()  # wake a device long-polling for work
        return task

    def wait(
        self,
        task_ids: Iterable[str],
        timeout_s: float | None,
        is_live: Callable[[int], bool],
        poll_s: float = 0.2,
        enough: int | None = None,
    ) -> None:
        """Block until every task ended, ``enough`` were submitted, or the timeout passed.

        A task whose device is no longer live is failed on the way, so a vanished phone never
        holds up a round.
        """
        end = None if timeout_s is None else self._clock() + timeout_s
        next_check = self._clock()
        with self._cond:
            tasks = [self._tasks[i] for i in task_ids]
            while True:
                now = self._clock()
                if now >= next_check:  # liveness and deadlines: every poll_s, not every wake-up
                    next_check = now + poll_s
                    self._expire(tasks, is_live, now)
                pending = submitted = 0
                for task in tasks:
                    pending += task.status == "pending"
                    submitted += task.status == "submitted"
                if not pending or (enough is not None and submitted >= enough):
                    return
                remaining = None if end is None else end - now
                if remaining is not None and remaining <= 0:
                    return
                wake = max(next_check - now, 0.001)
                self._cond.wait(wake if remaining is None else min(wake, remaining))

    def expire(self, task_ids: Iterable[str], is_live: Callable[[int], bool]) -> None:
        """Fail the pending tasks among ``task_ids`` whose device is gone or deadline passed."""
        with self._cond:
            tasks = [self._tasks[i] for i in task_ids if i in self._tasks]
            self._expire(tasks, is_live, self._clock())

    def _expire(self, tasks: Iterable[Task], is_live: Callable[[int], bool], now: float) -> None:
        for task in tasks:
            if task.status != "pending":
                continue
            if not is_live(task.node_id):
                self._fail(task, "device disconnected")
            elif now > task.deadline:
                self._fail(task, "deadline passed")

    def fail_node_tasks(self, node_id: int, reason: str) -> None:
        """End every pending task of a node as failed (its app restarted and lost them)."""
        with self._cond:
            for task in self._by_node.get(node_id, {}).values():
                if task.status == "pending":
                    self._fail(task, reason)

    def close(self, task_ids: Iterable[str], reason: str) -> None:
        """End the still-pending tasks as failed: their round is over."""
        with self._cond:
            for task_id in task_ids:
                task = self._tasks.get(task_id)
                if task is not None and task.status == "pending":
                    self._fail(task, reason)

    def take(self, task_ids: Iterable[str]) -> list[Task]:
        """Remove ended tasks from the board and return them (results included)."""
        with self._cond:
            ended = [
                self._tasks.pop(i)
                for i in list(task_ids)
                if i in self._tasks and self._tasks[i].status != "pending"
            ]
            for task in ended:
                mine = self._by_node[task.node_id]
                del mine[task.task_id]
                if not mine:
                    del self._by_node[task.node_id]
                self._closed[task.task_id] = (task.node_id, task.round, task.status, task.failure)
            while len(self._closed) > CLOSED_TASKS_KEPT:
                self._closed.popitem(last=False)
            return ended

    def finish_run(self, final_model: RoundModel | None, reason: str = "run complete") -> None:
        with self._cond:
            self._finished_model = final_model
            self._finished_reason = reason
            for task in self._tasks.values():
                if task.status == "pending":
                    self._fail(task, "run finished")
            self._cond.notify_all()

    def _fail(self, task: Task, reason: str) -> None:
        task.status = "failed"
        task.failure = reason
        self._cond.notify_all()

    # -- device side --------------------------------------------------------------------------

    def mark_told_finished(self, node_id: int) -> None:
        with self._cond:
            self._told_finished.add(node_id)

    def told_finished(self, node_ids: Iterable[int]) -> bool:
        """Whether every one of these nodes has been told that the run is finished."""
        with self._cond:
            return set(node_ids) <= self._told_finished

    @property
    def finished(self) -> tuple[bool, RoundModel | None, str]:
        with self._cond:
            return (
                bool(self._finished_reason),
                self._finished_model,
                self._finished_reason,
            )

    def pending(self) -> list[tuple[int, TaskKind, int]]:
        """For read-only views: (node id, kind, round) of every task not ended yet."""
        with self._cond:
            return [
                (t.node_id, t.kind, t.round) for t in self._tasks.values() if t.status == "pending"
            ]

    def next_task(self, node_id: int) -> Task | None:
        """The oldest pending task of a node (the same one again if it asks twice)."""
        with self._cond:
            now = self._clock()
            for task in self._by_node.get(node_id, {}).values():  # oldest first
                if task.status == "pending" and now <= task.deadline:
                    return task
            return None

    def remaining_s(self, task: Task) -> float:
        """Seconds left before the task's deadline (0 when passed)."""
        return max(task.deadline - self._clock(), 0.0)

    def wait_for_task(self, node_id: int, timeout_s: float) -> Task | None:
        """Wait up to ``timeout_s`` for a task for this node (or the end of the run)."""
        end = self._clock() + timeout_s
        with self._cond:
            while True:
                task = self.next_task(node_id)
                remaining = end - self._clock()
                if task is not None or self._finished_reason or remaining <= 0:
                    return task
                self._cond.wait(remaining)

    def task_for(self, task_id: str, node_id: int, kind: TaskKind | None = None) -> Task:
        """A task a device may act on, or the reason it may not."""
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None and task_id in self._closed:
                owner, round_number, status, failure = self._closed[task_id]
                _refuse_ended(task_id, node_id, owner, round_number, status, failure)
            if task is None:
                raise UNKNOWN_TASK.error(task=shown(task_id))
            if task.node_id != node_id:
                raise TASK_OF_OTHER_DEVICE.error(task=shown(task_id))
            if kind is not None and task.kind != kind:
                wrong = UPDATE_FOR_EVALUATE_TASK if kind == "train" else EVALUATION_FOR_TRAIN_TASK
                raise wrong.error(task=shown(task_id))
            if task.status == "pending" and self._clock() > task.deadline:
                self._fail(task, "deadline passed")
            _refuse_ended(task_id, node_id, node_id, task.round, task.status, task.failure)
            return task

    def complete(
        self,
        task_id: str,
        node_id: int,
        result: UpdateResult | EvaluationResult,
    ) -> Task:
        """Record a validated result; refused if the task ended meanwhile.

        A train task with an aggregator folds the update's tensors into it and keeps only its
        metrics. Should the fold fail, the task fails with it (and the error is raised): a
        submitted task always means an update that counts.
        """
        kind: TaskKind = "train" if isinstance(result, UpdateResult) else "evaluate"
        with self._cond:
            task = self.task_for(task_id, node_id, kind)
            aggregator = task.aggregator if isinstance(result, UpdateResult) else None
            task.status = "submitted"
            task.result = replace(result, parameters=[]) if aggregator is not None else result
            if aggregator is not None:
                aggregator.reserve()
            self._cond.notify_all()
        if aggregator is not None:
            try:
                aggregator.add(result)
            except Exception as exc:
                with self._cond:
                    task.result = None
                    self._fail(task, f"update not aggregated: {exc}")
                raise
        return task


def _refuse_ended(
    task_id: str, node_id: int, owner: int, round_number: int, status: TaskStatus, failure: str
) -> None:
    """Refuse acting on a task that is another device's or has ended; return if neither."""
    if owner != node_id:
        raise TASK_OF_OTHER_DEVICE.error(task=shown(task_id))
    if status == "submitted":
        raise TASK_SUBMITTED.error(task=shown(task_id), round=round_number)
    if status == "failed":
        raise TASK_CLOSED.error(task=shown(task_id), round=round_number, reason=failure)
