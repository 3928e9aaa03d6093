"""Regenerate the device protocol's Python stubs from ``protos/`` with grpcio-tools.

    python -m fedcoreml.ios_bridge.wire.generate [--check]

protoc names the modules after the proto package (``fedcoreml.v1``); the one import that
carries that name is rewritten to this package so the stubs live inside ``fedcoreml.ios_bridge``.
``--check`` writes nothing and exits 1 if the checked-in files differ from fresh output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

WIRE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = WIRE_DIR.parents[1] / "protos"
PROTO_FILE = "fedcoreml/v1/device.proto"
GENERATED = ("device_pb2.py", "device_pb2.pyi", "device_pb2_grpc.py")
_PROTOC_IMPORT = "from fedcoreml.v1 import device_pb2"
_PACKAGE_IMPORT = "from fedcoreml.ios_bridge.wire import device_pb2"


def generate(proto_root: Path = PROTO_ROOT) -> dict[str, bytes]:
    """Fresh stub contents, by file name."""
    with tempfile.TemporaryDirectory() as out:
        # protoc runs in its own process: in-process it can crash next to other native
        # protobuf runtimes (TensorFlow's) already loaded.
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto_root / PROTO_FILE),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO_FILE}: {result.stderr}")
        produced = Path(out) / Path(PROTO_FILE).parent
        return {
            name: (produced / name).read_text().replace(_PROTOC_IMPORT, _PACKAGE_IMPORT).encode()
            for name in GENERATED
        }


def stale_files(proto_root: Path = PROTO_ROOT, wire_dir: Path = WIRE_DIR) -> list[str]:
    """Names of checked-in stubs that differ from what the proto generates now."""
    fresh = generate(proto_root)
    return [
        name
        for name, content in fresh.items()
        if not (wire_dir / name).exists() or (wire_dir / name).read_bytes() != content
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {WIRE_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for name, content in generate().items():
        (WIRE_DIR / name).write_bytes(content)
        print(f"wrote {WIRE_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
