"""Every refusal the device gateway can answer with: one table, one wording each.

A row is a stable key, the gRPC status, the RPCs it can answer and the message template
(``str.format`` fields, filled with client strings already bounded by
:func:`~fedcoreml.ios_bridge.echo.shown`). The gateway raises only from here, so the table is the
whole list; ``protos/README.md`` documents it for app developers, and ``tests/test_contract.py``
keeps the two equal. Malformed update streams are worded in
:data:`~fedcoreml.ios_bridge.tensor_codec.UPDATE_REFUSALS` (the codec lives on the device side
too) and enter the table as ``INVALID_ARGUMENT`` rows of ``SubmitUpdate``. The ``grpc`` rows are
statuses gRPC itself answers before any gateway code runs; they are listed so that the contract
is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedcoreml.ios_bridge.channel import DEVICE_ID_RULE, MAX_MESSAGE_BYTES
from fedcoreml.ios_bridge.tensor_codec import UPDATE_REFUSALS, MalformedUpdateError
from fedcoreml.server.gateway.errors import GatewayError

__all__ = ["MAX_EXAMPLES", "REFUSALS", "RPCS", "Refusal", "update_refusal"]

RPCS = ("Register", "GetTask", "DownloadModel", "SubmitUpdate", "SubmitEvaluation")
SESSION_RPCS = RPCS[1:]  # every RPC that carries a session_id
TASK_RPCS = ("DownloadModel", "SubmitUpdate", "SubmitEvaluation")
RESULT_RPCS = ("SubmitUpdate", "SubmitEvaluation")

MAX_EXAMPLES = 10_000_000  # a plausible ceiling for one device's data set


@dataclass(frozen=True)
class Refusal:
    """One row of the table; :meth:`error` is the exception to raise for it."""

    key: str
    status: str  # a grpc.StatusCode member name
    rpcs: tuple[str, ...]
    template: str
    source: Literal["gateway", "grpc"] = "gateway"

    def error(self, **fields: object) -> GatewayError:
        return GatewayError(self.template.format(**fields), self.status, self.key)


def _row(key: str, status: str, rpcs: tuple[str, ...], template: str) -> Refusal:
    return Refusal(key, status, rpcs, template)


# -- authentication (the interceptor, with --require-tokens) ------------------------------------
MISSING_TOKEN = _row("missing_token", "UNAUTHENTICATED", RPCS, "missing bearer token")
UNKNOWN_TOKEN = _row("unknown_token", "UNAUTHENTICATED", RPCS, "unknown or revoked token")
TOKEN_STORE_UNREADABLE = _row(
    "token_store_unreadable", "UNAVAILABLE", RPCS, "the token store is unreadable; retry later"
)
RATE_LIMITED = _row(
    "rate_limited",
    "RESOURCE_EXHAUSTED",
    RPCS,
    "rate limit of {rate} calls/s (burst {burst}) exceeded; retry after {retry_ms} ms",
)
# -- Register -----------------------------------------------------------------------------------
INVALID_DEVICE_ID = _row(
    "invalid_device_id",
    "INVALID_ARGUMENT",
    ("Register",),
    f"device_id must be {DEVICE_ID_RULE}, got {{device_id}}",
)
TOKEN_FOR_OTHER_DEVICE = _row(
    "token_for_other_device",
    "PERMISSION_DENIED",
    ("Register",),
    "this token was issued for device {token_device}; it cannot register as {device_id}",
)
# -- sessions -----------------------------------------------------------------------------------
MISSING_SESSION = _row(
    "missing_session", "NOT_FOUND", SESSION_RPCS, "session_id is missing; call Register first"
)
UNKNOWN_SESSION = _row(
    "unknown_session", "NOT_FOUND", SESSION_RPCS, "unknown or expired session; call Register again"
)
SESSION_OF_OTHER_DEVICE = _row(
    "session_of_other_device",
    "PERMISSION_DENIED",
    SESSION_RPCS,
    "this session belongs to another device, not to {device_id}",
)
# -- tasks --------------------------------------------------------------------------------------
UNKNOWN_TASK = _row("unknown_task", "NOT_FOUND", TASK_RPCS, "unknown task id {task}")
TASK_OF_OTHER_DEVICE = _row(
    "task_of_other_device",
    "PERMISSION_DENIED",
    TASK_RPCS,
    "task {task} was given to another device",
)
TASK_SUBMITTED = _row(
    "task_submitted",
    "FAILED_PRECONDITION",
    TASK_RPCS,
    "task {task} of round {round} was already submitted",
)
TASK_CLOSED = _row(
    "task_closed",
    "FAILED_PRECONDITION",
    TASK_RPCS,
    "task {task} of round {round} is closed ({reason})",
)
UPDATE_FOR_EVALUATE_TASK = _row(
    "update_for_evaluate_task",
    "FAILED_PRECONDITION",
    ("SubmitUpdate",),
    "task {task} is an evaluate task, not a train task",
)
EVALUATION_FOR_TRAIN_TASK = _row(
    "evaluation_for_train_task",
    "FAILED_PRECONDITION",
    ("SubmitEvaluation",),
    "task {task} is a train task, not an evaluate task",
)
# -- DownloadModel ------------------------------------------------------------------------------
OFFSET_PAST_END = _row(
    "offset_past_end",
    "OUT_OF_RANGE",
    ("DownloadModel",),
    "offset {offset} is past the end of the model ({size} bytes)",
)
# -- results ------------------------------------------------------------------------------------
NOTHING_TRAINED = _row(
    "nothing_trained",
    "INVALID_ARGUMENT",
    ("SubmitUpdate",),
    "the update is the model this task sent, unchanged: nothing was trained",
)
EXAMPLES_NOT_POSITIVE = _row(
    "examples_not_positive", "INVALID_ARGUMENT", RESULT_RPCS, "num_examples must be positive, got 0"
)
EXAMPLES_IMPLAUSIBLE = _row(
    "examples_implausible",
    "INVALID_ARGUMENT",
    RESULT_RPCS,
    f"num_examples {{value}} is implausible (more than {MAX_EXAMPLES:,})",
)
INVALID_LOSS = _row(
    "invalid_loss",
    "INVALID_ARGUMENT",
    RESULT_RPCS,
    "loss must be a finite, non-negative number, got {value}",
)
INVALID_ACCURACY = _row(
    "invalid_accuracy", "INVALID_ARGUMENT", RESULT_RPCS, "accuracy must lie in [0, 1], got {value}"
)
INVALID_TRAIN_SECONDS = _row(
    "invalid_train_seconds",
    "INVALID_ARGUMENT",
    ("SubmitUpdate",),
    "train_seconds must be a finite, non-negative number, got {value}",
)
# -- gRPC's own, before the gateway sees the call -----------------------------------------------
MESSAGE_TOO_LARGE = Refusal(
    "message_too_large",
    "RESOURCE_EXHAUSTED",
    RPCS,
    f"Received message larger than max ({{size}} vs. {MAX_MESSAGE_BYTES})",
    source="grpc",
)
UNPARSEABLE_MESSAGE = Refusal(
    "unparseable_message", "INTERNAL", RPCS, "Exception deserializing request!", source="grpc"
)

_UPDATE_ROWS = tuple(
    _row(key, "INVALID_ARGUMENT", ("SubmitUpdate",), template)
    for key, template in UPDATE_REFUSALS.items()
)

#: Every refusal by key.
REFUSALS: dict[str, Refusal] = {
    row.key: row
    for row in (
        MISSING_TOKEN,
        UNKNOWN_TOKEN,
        TOKEN_STORE_UNREADABLE,
        RATE_LIMITED,
        INVALID_DEVICE_ID,
        TOKEN_FOR_OTHER_DEVICE,
        MISSING_SESSION,
        UNKNOWN_SESSION,
        SESSION_OF_OTHER_DEVICE,
        UNKNOWN_TASK,
        TASK_OF_OTHER_DEVICE,
        TASK_SUBMITTED,
        TASK_CLOSED,
        UPDATE_FOR_EVALUATE_TASK,
        EVALUATION_FOR_TRAIN_TASK,
        OFFSET_PAST_END,
        *_UPDATE_ROWS,
        NOTHING_TRAINED,
        EXAMPLES_NOT_POSITIVE,
        EXAMPLES_IMPLAUSIBLE,
        INVALID_LOSS,
        INVALID_ACCURACY,
        INVALID_TRAIN_SECONDS,
        MESSAGE_TOO_LARGE,
        UNPARSEABLE_MESSAGE,
    )
}


def update_refusal(exc: MalformedUpdateError) -> GatewayError:
    """The gateway error for a malformed update stream, worded as the codec worded it."""
    row = REFUSALS[exc.key]
    return GatewayError(str(exc), row.status, row.key)
