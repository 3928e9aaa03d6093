"""The gRPC ``DeviceService``: the coordinator's door for iPhones and simulated devices.

Every request is checked before it touches state; a refusal is a gRPC status with a message
that says what is wrong (see protos/README.md for the contract). Results are decoded against the
model's updatable parameters and handed to the task board only when valid.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc
import numpy as np

from fedcoreml.ios_bridge.channel import DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES
from fedcoreml.ios_bridge.echo import capped, shown
from fedcoreml.ios_bridge.mlmodel_io import spec_from_bytes
from fedcoreml.ios_bridge.parameters import ParameterInfo, get_parameters
from fedcoreml.ios_bridge.tensor_codec import MalformedUpdateError, decode_update, first_header
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc
from fedcoreml.server import crash_points
from fedcoreml.server.gateway import refusals
from fedcoreml.server.gateway.auth import authenticated_device_id
from fedcoreml.server.gateway.eligibility import Capabilities
from fedcoreml.server.gateway.errors import GatewayError
from fedcoreml.server.gateway.listen import ListenError, check_listen_address
from fedcoreml.server.gateway.refusal_counts import RefusalCounts
from fedcoreml.server.gateway.sessions import Session, SessionRegistry
from fedcoreml.server.gateway.task_board import (
    EvaluationResult,
    RoundModel,
    Task,
    TaskBoard,
    UpdateResult,
)

log = logging.getLogger("fedcoreml.gateway")

DOWNLOAD_CHUNK_BYTES = 1024 * 1024


def _model_ref(task_model) -> device_pb2.ModelRef:
    return device_pb2.ModelRef(
        version=task_model.version, sha256=task_model.sha256, size_bytes=len(task_model.data)
    )


@functools.lru_cache(maxsize=4)  # a few rounds' models
def _shipped_parameters(model: RoundModel) -> dict[str, np.ndarray]:
    """The parameters inside a model as devices download it."""
    return dict(get_parameters(spec_from_bytes(model.data)))


def _check_trained(model: RoundModel, parameters: list[tuple[str, np.ndarray]]) -> None:
    """Refuse an update that is the very model the device was sent.

    Training changes the parameters; returning them untouched claims examples without work (a
    free rider), and an update of norm zero is one that Flower's server-side clipping cannot
    handle (it divides by the norm).
    """
    shipped = _shipped_parameters(model)
    if all(np.array_equal(value, shipped[name]) for name, value in parameters):
        raise refusals.NOTHING_TRAINED.error()


def _capabilities(request) -> Capabilities | None:
    """The request's ``capabilities``, or None when it carries none."""
    if not request.HasField("capabilities"):
        return None
    return Capabilities.of(request.capabilities)


def _check_metrics(num_examples: int, loss: float, accuracy: float) -> None:
    if num_examples <= 0:
        raise refusals.EXAMPLES_NOT_POSITIVE.error()
    if num_examples > refusals.MAX_EXAMPLES:
        raise refusals.EXAMPLES_IMPLAUSIBLE.error(value=num_examples)
    if not math.isfinite(loss) or loss < 0:
        raise refusals.INVALID_LOSS.error(value=loss)
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise refusals.INVALID_ACCURACY.error(value=accuracy)


def _check_train_seconds(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise refusals.INVALID_TRAIN_SECONDS.error(value=seconds)


class HandoutSchedule:
    """Hands tasks out at most ``rate_per_s`` per second, each device at a time slot of its own.

    When a round starts, every device polling would get its task, and start a 2.3 MB download, in
    the same second. Instead, the first time a device asks for a task it is given the next free
    slot, and told to come back then: the round's transfers spread evenly, and nobody polls in
    vain meanwhile.
    """

    def __init__(self, rate_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"the hand-out rate must be a positive number, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0

    def wait_s(self, task: Task) -> float:
        """Seconds until ``task`` may be handed out (0: now); books its slot on first ask."""
        now = self._clock()
        if task.handout_at is None:
            with self._lock:
                task.handout_at = max(self._next, now)
                self._next = task.handout_at + 1.0 / self.rate_per_s
        return max(task.handout_at - now, 0.0)


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Serves the device protocol over a session registry and a task board."""

    def __init__(
        self,
        registry: SessionRegistry,
        board: TaskBoard,
        parameter_infos: list[ParameterInfo],
        poll_interval_ms: int = 1000,
        long_poll_ms: int = 2000,
        max_long_polls: int = 16,
        handout: HandoutSchedule | None = None,
        refusal_counts: RefusalCounts | None = None,
    ) -> None:
        self.registry = registry
        self.board = board
        self.infos = parameter_infos
        self.poll_interval_ms = poll_interval_ms
        self.long_poll_ms = long_poll_ms
        self.handout = handout
        self.refusal_counts = refusal_counts or RefusalCounts()
        # Each long poll holds a server thread; beyond this many, GetTask answers at once.
        self._long_polls = threading.BoundedSemaphore(max_long_polls)

    # Each handler runs its body through _guarded, which turns refusals into gRPC statuses.
    def _guarded(self, context: grpc.ServicerContext, rpc: str, body: Callable[[], object]):
        try:
            return body()
        except GatewayError as exc:
            details = capped(str(exc))  # one line, well under gRPC's metadata limit
            self.refusal_counts.add(exc.key)
            log.info("%s refused (%s %s): %s", rpc, exc.code, exc.key, details)
            context.abort(getattr(grpc.StatusCode, exc.code), details)

    def _session(self, session_id: str) -> Session:
        """The caller's live session, refreshed; with auth on, only one of its own device."""
        return self.registry.touch(session_id, device_id=authenticated_device_id())

    def Register(self, request, context):  # noqa: N802 (gRPC method name)
        def body():
            caller = authenticated_device_id()
            if caller is not None and caller != request.device_id:
                raise refusals.TOKEN_FOR_OTHER_DEVICE.error(
                    token_device=shown(caller), device_id=shown(request.device_id)
                )
            session = self.registry.register(
                request.device_id,
                request.platform,
                request.os_version,
                request.app_version,
                _capabilities(request),
            )
            # A device that registers again has restarted: whatever it was doing is lost.
            self.board.fail_node_tasks(session.node_id, "device registered again")
            log.info(
                "device %s registered (%s %s, app %s) as node %d",
                shown(request.device_id), shown(request.platform), shown(request.os_version),
                shown(request.app_version), session.node_id,
            )  # fmt: skip
            return device_pb2.RegisterResponse(
                session_id=session.session_id,
                pacing=device_pb2.PacingHints(
                    poll_interval_ms=self.poll_interval_ms,
                    max_message_bytes=MAX_MESSAGE_BYTES,
                    chunk_bytes=DEFAULT_CHUNK_BYTES,
                    session_ttl_ms=int(self.registry.idle_ttl_s * 1000),
                    long_poll_ms=min(self.long_poll_ms, int(self.registry.idle_ttl_s * 500)),
                ),
            )

        return self._guarded(context, "Register", body)

    def GetTask(self, request, context):  # noqa: N802
        def body():
            session = self._session(request.session_id)
            # An ineligible device is given no task (one already handed to it stays its own).
            ineligible = self.registry.report(session.node_id, _capabilities(request))
            task = None if ineligible else self.board.next_task(session.node_id)
            if (
                task is None
                and not ineligible
                and self.long_poll_ms > 0
                and self._long_polls.acquire(blocking=False)
            ):
                # An idle device waits here for work instead of polling again and again; it
                # stays live meanwhile (the wait is never longer than half the session TTL).
                wait_s = min(self.long_poll_ms / 1000, self.registry.idle_ttl_s / 2)
                self.registry.hold(session.node_id, time.monotonic() + wait_s + 1.0)
                try:
                    task = self.board.wait_for_task(session.node_id, wait_s)
                finally:
                    self._long_polls.release()
                    self.registry.release(session.node_id)
                session = self._session(request.session_id)
            if task is not None and self.handout is not None:
                # (asking again before the slot, within the session's TTL, keeps it alive)
                wait_s = min(self.handout.wait_s(task), self.registry.idle_ttl_s / 2)
                if wait_s > 0.001:
                    return device_pb2.GetTaskResponse(
                        wait=device_pb2.Wait(
                            retry_after_ms=math.ceil(wait_s * 1000),
                            reason=f"tasks are handed out {self.handout.rate_per_s:g} per "
                            "second; yours is ready then",
                        )
                    )
            if task is not None:
                # Working on a task, a device may stay silent until the task's deadline.
                self.registry.hold(session.node_id, task.deadline)
                crash_points.after_reply(context, "after-handout", task.model.version)
                return self._task_message(task)
            finished, final_model, reason = self.board.finished
            if finished:
                self.board.mark_told_finished(session.node_id)
                if final_model is not None:
                    crash_points.after_reply(context, "after-run-finished", final_model.version)
                return device_pb2.GetTaskResponse(
                    finished=device_pb2.RunFinished(
                        reason=reason,
                        final_model=_model_ref(final_model) if final_model else None,
                    )
                )
            return device_pb2.GetTaskResponse(
                wait=device_pb2.Wait(
                    retry_after_ms=self.poll_interval_ms,
                    reason=ineligible or "no task for this device yet",
                )
            )

        return self._guarded(context, "GetTask", body)

    def _task_message(self, task: Task) -> device_pb2.GetTaskResponse:
        remaining_ms = int(self.board.remaining_s(task) * 1000)
        if task.kind == "train":
            assert task.config is not None
            return device_pb2.GetTaskResponse(
                train=device_pb2.TrainTask(
                    task_id=task.task_id,
                    round=task.round,
                    model=_model_ref(task.model),
                    config=device_pb2.TrainConfig(
                        epochs=task.config.epochs,
                        batch_size=task.config.batch_size,
                        learning_rate=task.config.learning_rate,
                    ),
                    deadline_ms=remaining_ms,
                )
            )
        return device_pb2.GetTaskResponse(
            evaluate=device_pb2.EvaluateTask(
                task_id=task.task_id,
                round=task.round,
                model=_model_ref(task.model),
                deadline_ms=remaining_ms,
            )
        )

    def DownloadModel(self, request, context) -> Iterator[device_pb2.ModelChunk]:  # noqa: N802
        def body():
            session = self._session(request.session_id)
            task = self.board.task_for(request.task_id, session.node_id)
            self.registry.hold(session.node_id, task.deadline)
            data = task.model.data
            if request.offset > len(data):
                raise refusals.OFFSET_PAST_END.error(offset=request.offset, size=len(data))
            return task.model, data

        found = self._guarded(context, "DownloadModel", body)
        model, data = found
        offset = int(request.offset)
        while True:
            chunk = data[offset : offset + DOWNLOAD_CHUNK_BYTES]
            yield device_pb2.ModelChunk(
                offset=offset, data=chunk, total_size=len(data), sha256=model.sha256
            )
            offset += len(chunk)
            if offset >= len(data):
                return

    def SubmitUpdate(self, request_iterator, context):  # noqa: N802
        def body():
            try:
                # Check who is sending before reading (and buffering) the tensors.
                first, messages = first_header(request_iterator)
                session = self._session(first.header.session_id)
                assigned = self.board.task_for(first.header.task_id, session.node_id, "train")
                header, parameters = decode_update(itertools.chain([first], messages), self.infos)
            except MalformedUpdateError as exc:
                raise refusals.update_refusal(exc) from None
            _check_metrics(header.num_examples, header.loss, header.accuracy)
            _check_train_seconds(header.train_seconds)
            _check_trained(assigned.model, parameters)
            task = self.board.complete(
                header.task_id,
                session.node_id,
                UpdateResult(
                    parameters=parameters,
                    num_examples=header.num_examples,
                    loss=header.loss,
                    accuracy=header.accuracy,
                    train_seconds=header.train_seconds,
                ),
            )
            self.registry.release(session.node_id)
            log.info(
                "update for round %d from node %d: %d examples, loss %.4f, accuracy %.4f",
                task.round, session.node_id, header.num_examples, header.loss, header.accuracy,
            )  # fmt: skip
            return device_pb2.SubmitUpdateResponse(accepted=True, round=task.round)

        return self._guarded(context, "SubmitUpdate", body)

    def SubmitEvaluation(self, request, context):  # noqa: N802
        def body():
            session = self._session(request.session_id)
            self.board.task_for(request.task_id, session.node_id, "evaluate")
            _check_metrics(request.num_examples, request.loss, request.accuracy)
            self.board.complete(
                request.task_id,
                session.node_id,
                EvaluationResult(request.num_examples, request.loss, request.accuracy),
            )
            self.registry.release(session.node_id)
            return device_pb2.SubmitEvaluationResponse(accepted=True)

        return self._guarded(context, "SubmitEvaluation", body)


TRANSFER_METHODS = frozenset({"DownloadModel", "SubmitUpdate"})


class _TransferPool(grpc.ServerInterceptor):
    """Runs the bulk transfers (model downloads, update uploads) on their own few threads.

    A round sends every device a 2.3 MB model and receives as much back, all at once. On one
    shared pool those calls queue ahead of the small ones, and an idle phone's GetTask would
    wait seconds behind a thousand transfers; here they wait only for each other. gRPC picks
    the pool from the ``experimental_thread_pool`` attribute of a method's behaviour.
    """

    def __init__(self, pool: futures.ThreadPoolExecutor) -> None:
        self.pool = pool

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method not in TRANSFER_METHODS:
            return handler
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._on_pool(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._on_pool(handler.stream_unary))
        return handler

    def _on_pool(self, behaviour: Callable) -> Callable:
        def run(request, context):
            return behaviour(request, context)

        run.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return run


def start_server(
    service: DeviceService,
    address: str,
    max_workers: int = 32,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    transfer_workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start serving on ``address`` ("host:port"; port 0 picks one). Returns (server, port).

    ``credentials`` (see ``gateway.tls.server_credentials``) serve TLS instead of plaintext;
    ``interceptors`` run before every call (see ``gateway.auth.DeviceAuthInterceptor``).
    Model downloads and update uploads run on ``transfer_workers`` threads of their own, the
    other calls on ``max_workers``. An address it cannot listen on raises
    :class:`~fedcoreml.server.gateway.listen.ListenError` saying why, before anything starts.
    """
    check_listen_address(address)
    transfers = futures.ThreadPoolExecutor(transfer_workers, thread_name_prefix="transfer")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gateway"),
        interceptors=[_TransferPool(transfers), *interceptors],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Fixed flow-control windows: without this, gRPC grows each connection's window to
            # megabytes on a fast link, and a thousand queued uploads sit in the coordinator's
            # memory before a thread reads them.
            ("grpc.http2.bdp_probe", 0),
            # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would
            # start without error and take half of the devices' connections.
            ("grpc.so_reuseport", 0),
        ],
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(service, server)
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # lost a race for the port since the check, or a reason gRPC's own
        port = 0
    if port == 0:
        transfers.shutdown(wait=False)
        raise ListenError(f"cannot listen on {address}: gRPC could not bind it")
    server.start()
    return server, port
