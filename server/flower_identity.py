"""The one place fedcoreml sets Flower's task identity.

``flwr.app.Message(...)`` reads ``flwr.supercore.task_identity.TaskIdentity`` (run, node and task
id of the running process) and refuses to build a message without it. Flower's own runtime sets
it before a ServerApp runs; fedcoreml's coordinator runs strategies over its own Grid, so it sets
it here. This is an internal Flower API: ``tests/test_flower_identity.py`` fails loudly if an
upgrade moves or changes it.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(run_id: int, task_id: int = 1) -> None:
    """Act as the ServerApp task of run ``run_id`` on the coordinator (SuperLink) node."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id
