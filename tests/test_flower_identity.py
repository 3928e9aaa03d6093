"""Flower's task identity, an internal API fedcoreml relies on: fail loudly if it moves."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from flwr.app import ConfigRecord, Message, RecordDict
try:
    Message(RecordDict({"config": ConfigRecord()}), 1, "train")
except Exception as exc:
    print("refused:", type(exc).__name__)
from fedcoreml.server.flower_identity import set_task_identity
set_task_identity(run_id=42)
message = Message(RecordDict({"config": ConfigRecord()}), 1, "train")
print("built:", message.metadata.run_id, message.metadata.src_node_id)
"""


def test_messages_need_the_identity_and_get_it_from_one_place():
    # A fresh process: the identity is class-level state.
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, (
        "flwr.supercore.task_identity.TaskIdentity moved or changed in this Flower version; "
        f"update fedcoreml/server/flower_identity.py.\n{result.stderr}"
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "refused: RuntimeError"
    from flwr.common.constant import SUPERLINK_NODE_ID

    assert lines[1] == f"built: 42 {SUPERLINK_NODE_ID}"


def test_identity_is_set_nowhere_else():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    users = [
        p.relative_to(root).as_posix()
        for folder in ("server", "client_sim", "ios_bridge")
        for p in (root / folder).rglob("*.py")
        if "TaskIdentity" in p.read_text()
    ]
    assert users == ["server/flower_identity.py"]
