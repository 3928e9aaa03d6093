"""A live gateway for tests: the real DeviceService on 127.0.0.1 (port chosen at run time)
with its registry, task board and a client stub, over the default model's parameters."""

from __future__ import annotations

import grpc

from fedcoreml.ios_bridge.default_model import build_default_model
from fedcoreml.ios_bridge.parameters import parameter_infos
from fedcoreml.ios_bridge.wire import device_pb2, device_pb2_grpc
from fedcoreml.server.gateway.service import DeviceService, start_server
from fedcoreml.server.gateway.sessions import SessionRegistry
from fedcoreml.server.gateway.task_board import TaskBoard

SPEC = build_default_model(seed=0)


class Gateway:
    """``long_poll_ms`` as the coordinator's option; ``client_send_limit`` lets the test's
    client send messages past the gateway's receive limit (to see them refused)."""

    def __init__(
        self, interceptors=(), long_poll_ms: int = 100, client_send_limit: int | None = None
    ) -> None:
        self.registry = SessionRegistry(idle_ttl_s=30)
        self.board = TaskBoard()
        self.service = DeviceService(
            self.registry, self.board, parameter_infos(SPEC), 50, long_poll_ms=long_poll_ms
        )
        self.server, self.port = start_server(
            self.service, "127.0.0.1:0", interceptors=interceptors
        )
        options = [] if client_send_limit is None else [
            ("grpc.max_send_message_length", client_send_limit)
        ]  # fmt: skip
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=options)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)

    def register(self, device_id: str, **kw) -> tuple[str, int]:
        """A new session for ``device_id``: (session id, node id)."""
        reply = self.stub.Register(device_pb2.RegisterRequest(device_id=device_id), **kw)
        return reply.session_id, self.registry.touch(reply.session_id).node_id

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
