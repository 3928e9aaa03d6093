"""Generated Python code for the device protocol (protos/fedcoreml/v1/device.proto).

Do not edit ``device_pb2*.py`` by hand: run ``python -m fedcoreml.ios_bridge.wire.generate``.
A test regenerates them and fails when the checked-in files are stale.
"""
