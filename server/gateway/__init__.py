"""The gRPC device gateway: sessions, the task board, and the ``DeviceService`` server.

The coordinator assigns tasks on the board; devices pull them over gRPC, download the round's
.mlmodel and push their results, which are validated here before anything can reach a model.
"""
