"""DeviceGrid: Flower's ``Grid`` over the gRPC device gateway, so Flower's strategies drive rounds.

Connected devices are the Grid's nodes. A message to a node becomes a task on the board: its
``ArrayRecord`` is baked into a .mlmodel (once per distinct parameter set) that the device
downloads, and its ``ConfigRecord`` gives the training overrides. A device's validated result
comes back as the reply message Flower expects: an ``ArrayRecord`` of the updated parameters
(Core ML layout, the model's names) and a ``MetricRecord`` with ``num-examples``, ``loss``,
``accuracy`` and ``train-seconds``.

Every model is handed to ``publish`` (the run's commit, :meth:`FederatedRun.publish`) before the
first task naming it goes on the board, so no device can be told of a version that a crash could
take back.

DeviceGrid is also an :class:`~fedcoreml.server.mean_on_arrival.UpdateFeed`: when a strategy
hands it an aggregator for a training round, every update accepted in that round is folded into
it as it arrives, and each device's reply carries only its own MetricRecord.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcoreml.ios_bridge.flower_messages import (
    ACCURACY_KEY,
    BATCH_SIZE_KEY,
    EPOCHS_KEY,
    LEARNING_RATE_KEY,
    LOSS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    TRAIN_SECONDS_KEY,
    arrays_to_parameters,
    parameters_to_arrays,
)
from fedcoreml.server.exchanges import ExchangeStats, message_round
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import (
    EvaluationResult,
    RoundModel,
    Task,
    TaskBoard,
    TaskConfig,
    UpdateResult,
)
from fedcoreml.server.model_store import ModelStore
from fedcoreml.server.streaming_mean import StreamingWeightedMean

log = logging.getLogger("fedcoreml.grid")

# Flower error code for a device that did not deliver (not one of Flower's own codes).
DEVICE_FAILED = 1001


@dataclass(frozen=True)
class RoundPolicy:
    """How DeviceGrid copes with devices that vanish or straggle.

    ``over_selection``: ask this many times the devices a strategy sampled (other live devices
    make up the difference) and close as soon as the sampled number reported, as production FL
    systems do (~1.3). ``min_reports``: an exchange with fewer valid reports is abandoned and
    sent again to a fresh sample, up to ``max_attempts`` times in all.
    """

    over_selection: float = 1.0
    min_reports: int = 1
    max_attempts: int = 3


def _give_id(message: Message) -> Message:
    """A fresh message id, as Flower's own grids give a message they push or a reply."""
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return message


class DeviceGrid(Grid):
    """A Flower Grid whose nodes are devices connected to the gateway."""

    def __init__(
        self,
        registry: SessionRegistry,
        board: TaskBoard,
        store: ModelStore,
        run_id: int,
        task_timeout_s: float = 600.0,
        round_offset: int = 0,
        policy: RoundPolicy | None = None,
        publish: Callable[[RoundModel], None] | None = None,
    ) -> None:
        self.registry = registry
        self.board = board
        self.store = store
        self.task_timeout_s = task_timeout_s
        self.round_offset = round_offset
        self.policy = policy or RoundPolicy()
        # called with every model before a task names it: commits it (FederatedRun.publish)
        self.publish = publish
        self._run = Run.create_empty(run_id)
        self._lock = threading.Lock()
        self._pushed: dict[str, tuple[Message, Task]] = {}  # message id -> (instruction, task)
        # strategy's server round -> the aggregator its accepted train updates are folded into
        self._aggregators: dict[int, StreamingWeightedMean] = {}
        self.history: list[ExchangeStats] = []
        # the last model built, with the ArrayRecord it was built from (kept alive, so that an
        # identity match is that record): the messages of a push share one record, and a strategy
        # that pushes a few messages at a time (FedBuff) has each version baked once
        self._last_built: tuple[ArrayRecord, RoundModel] | None = None

    # -- Grid API -----------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.registry.live_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            task = self._assign(message)
            _give_id(message)
            with self._lock:
                self._pushed[message.metadata.message_id] = (message, task)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            wanted = {i: self._pushed[i] for i in message_ids if i in self._pushed}
        # a vanished device's or an overdue task ends here too, for callers that only pull
        self.board.expire([task.task_id for _, task in wanted.values()], self.registry.is_live)
        ended = {t.task_id: t for t in self.board.take(task.task_id for _, task in wanted.values())}
        replies = []
        for message_id, (message, task) in wanted.items():
            done = ended.get(task.task_id)
            if done is None:
                continue
            with self._lock:
                del self._pushed[message_id]
            replies.append(self._reply(message, done))
        return replies

    def close_messages(self, message_ids: Iterable[str], reason: str) -> None:
        """End pushed messages early: their devices' submissions are refused with ``reason``.

        Their replies (errors naming ``reason``, or the result of a device that submitted just
        before) are still pulled as usual. This makes DeviceGrid a
        :class:`~fedcoreml.server.fedbuff.ClosableGrid`.
        """
        with self._lock:
            tasks = [self._pushed[i][1].task_id for i in message_ids if i in self._pushed]
        self.board.close(tasks, reason)

    # -- UpdateFeed ---------------------------------------------------------------------------

    def fold_train_updates(self, server_round: int, aggregator: StreamingWeightedMean) -> None:
        """Fold the accepted updates of ``server_round``'s train messages into ``aggregator``.

        One training round runs at a time: an earlier round's aggregator is let go.
        """
        with self._lock:
            self._aggregators = {server_round: aggregator}

    def _aggregator(self, message: Message) -> StreamingWeightedMean | None:
        if message.metadata.message_type != MessageType.TRAIN:
            return None
        with self._lock:
            return self._aggregators.get(message_round(message))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        start = time.monotonic()
        started_at = time.time()
        messages = list(messages)
        if not messages:
            return []
        wanted = len(messages)
        wait_s = self.task_timeout_s if timeout is None else min(timeout, self.task_timeout_s)
        aggregator = self._aggregator(messages[0])
        abandoned = 0
        while True:
            batch = self._over_select(messages)
            replies, stats = self._exchange(batch, wanted, wait_s, aggregator)
            if stats.reported >= self.policy.min_reports:
                break
            if abandoned + 1 >= self.policy.max_attempts:
                log.warning(
                    "round %d: %s still has only %d report(s) after %d attempts (minimum %d); "
                    "going on with what arrived", stats.round, stats.kind, stats.reported,
                    abandoned + 1, self.policy.min_reports,
                )  # fmt: skip
                break
            abandoned += 1
            if aggregator is not None:  # the attempt's replies are dropped: so are its updates
                aggregator.clear()
            log.warning(
                "round %d: %s abandoned with %d of %d report(s) (minimum %d); sending it again "
                "(attempt %d of %d)", stats.round, stats.kind, stats.reported, stats.sampled,
                self.policy.min_reports, abandoned + 1, self.policy.max_attempts,
            )  # fmt: skip
            messages = self._resample(messages, wait_s)
        if aggregator is not None:
            with self._lock:  # the round's exchange is over; the strategy holds the aggregator
                self._aggregators.pop(message_round(messages[0]), None)
        stats.abandoned = abandoned
        stats.started_at = started_at
        stats.seconds = time.monotonic() - start
        self.history.append(stats)
        log.info(
            "round %d: %s closed: %d reported, %d failed, %d examples, %.1f s",
            stats.round, stats.kind, stats.reported, stats.failed, stats.examples, stats.seconds,
        )  # fmt: skip
        return replies

    def _exchange(
        self,
        messages: list[Message],
        wanted: int,
        wait_s: float,
        aggregator: StreamingWeightedMean | None,
    ) -> tuple[list[Message], ExchangeStats]:
        ids = self.push_messages(messages)
        with self._lock:
            tasks = [self._pushed[i][1] for i in ids]
        stats = ExchangeStats(kind=tasks[0].kind, round=tasks[0].round, sampled=len(tasks))
        log.info("round %d: %s task sent to %d device(s)", stats.round, stats.kind, stats.sampled)
        task_ids = [t.task_id for t in tasks]
        self.board.wait(task_ids, wait_s, self.registry.is_live, enough=wanted)
        self.board.close(task_ids, "round closed")  # stragglers past this point are refused
        if aggregator is not None:
            aggregator.settle()  # every accepted update folded in (or its task failed)
        replies = sorted(self.pull_messages(ids), key=self._reply_order)
        stats.count(replies)
        return replies, stats

    def _reply_order(self, reply: Message) -> tuple[str, int]:
        """Replies in the order of their devices' ids, whatever order they arrived in.

        Aggregating floats in a fixed order makes a round's result reproducible.
        """
        node = reply.metadata.src_node_id
        session = self.registry.session_of(node)
        return (session.device_id if session is not None else "", node)

    def _copy_to(self, message: Message, node_id: int) -> Message:
        return Message(
            message.content,
            node_id,
            message.metadata.message_type,
            group_id=message.metadata.group_id,
        )

    def _over_select(self, messages: list[Message]) -> list[Message]:
        """The strategy's messages plus copies for extra live devices (over-selection)."""
        extra = math.ceil(len(messages) * (self.policy.over_selection - 1.0) - 1e-9)
        if extra <= 0:
            return messages
        chosen = {m.metadata.dst_node_id for m in messages}
        spare = [n for n in self.registry.live_node_ids() if n not in chosen]
        picked = random.sample(spare, min(extra, len(spare)))
        return messages + [self._copy_to(messages[0], node) for node in picked]

    def _resample(self, messages: list[Message], wait_s: float) -> list[Message]:
        """The same messages for a fresh random sample of live devices.

        Waits (up to ``wait_s``) until enough devices are live to meet the minimum.
        """
        needed = max(1, min(len(messages), self.policy.min_reports))
        end = time.monotonic() + wait_s
        live = self.registry.live_node_ids()
        while len(live) < needed and time.monotonic() < end:
            time.sleep(0.1)
            live = self.registry.live_node_ids()
        while not live:  # nobody at all: wait for a device rather than send nothing
            time.sleep(0.2)
            live = self.registry.live_node_ids()
        nodes = random.sample(live, min(len(messages), len(live)))
        return [self._copy_to(messages[0], node) for node in nodes]

    # -- translation --------------------------------------------------------------------------

    def _assign(self, message: Message) -> Task:
        content = message.content
        kind = message.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            raise ValueError(f"devices only train and evaluate; got a '{kind}' message")
        arrays = next(iter(content.array_records.values()))
        config = next(iter(content.config_records.values()), ConfigRecord())
        server_round = int(config.get(ROUND_KEY, 0)) + self.round_offset
        # Train tasks ship the previous round's aggregate; evaluate tasks this round's.
        version = server_round - 1 if kind == MessageType.TRAIN else server_round
        last = self._last_built
        if last is not None and last[0] is arrays and last[1].version == max(version, 0):
            model = last[1]
        else:
            model = self.store.build(arrays_to_parameters(arrays), version=max(version, 0))
            if self.publish is not None:  # durable before any device can be told of it
                self.publish(model)
            self._last_built = (arrays, model)
        task_config = None
        if kind == MessageType.TRAIN:
            task_config = TaskConfig(
                epochs=int(config[EPOCHS_KEY]),
                batch_size=int(config[BATCH_SIZE_KEY]),
                learning_rate=float(config[LEARNING_RATE_KEY]),
            )
        task = self.board.assign(
            message.metadata.dst_node_id,
            "train" if kind == MessageType.TRAIN else "evaluate",
            server_round,
            model,
            task_config,
            self.task_timeout_s,
            aggregator=self._aggregator(message),
        )
        return task

    def _reply(self, message: Message, task: Task) -> Message:
        if task.status != "submitted" or task.result is None:
            return _give_id(
                Message(Error(DEVICE_FAILED, task.failure or "no result"), reply_to=message)
            )
        return self._result_reply(message, task.result, folded=task.aggregator is not None)

    def _result_reply(
        self, message: Message, result: UpdateResult | EvaluationResult, folded: bool
    ) -> Message:
        """The device's own reply: its metrics, and its update unless that was folded in."""
        metrics = {
            NUM_EXAMPLES_KEY: result.num_examples,
            LOSS_KEY: result.loss,
            ACCURACY_KEY: result.accuracy,
        }
        content = RecordDict()
        if isinstance(result, UpdateResult):
            metrics[TRAIN_SECONDS_KEY] = result.train_seconds
            if not folded:
                content["arrays"] = parameters_to_arrays(result.parameters)
        content["metrics"] = MetricRecord(metrics)
        return _give_id(Message(content, reply_to=message))
