#!/usr/bin/env bash
# Generates the Swift side of protos/fedcoreml/v1/device.proto for the Apple adapters:
#   Apple/Sources/FedCoreMLApple/Generated/device.pb.swift    messages (swift-protobuf)
#   Apple/Sources/FedCoreMLApple/Generated/device.grpc.swift  stubs (grpc-swift 2; the server side
#                                                             serves the tests' fake coordinator)
#
# The command it runs (from the repository root):
#   protoc --proto_path=protos \
#     --plugin=protoc-gen-swift=PATH --swift_opt=Visibility=Internal,FileNaming=DropPath \
#     --swift_out=ios_bridge/swift/Apple/Sources/FedCoreMLApple/Generated \
#     --plugin=protoc-gen-grpc-swift-2=PATH \
#     --grpc-swift-2_opt=Visibility=Internal,Server=True,Client=True,FileNaming=DropPath \
#     --grpc-swift-2_out=ios_bridge/swift/Apple/Sources/FedCoreMLApple/Generated \
#     fedcoreml/v1/device.proto
#
# Tools, each overridable through the environment:
#   PROTOC                   protoc (default: protoc on the PATH, else the repository's own
#                            `python3 -m grpc_tools.protoc` from grpcio-tools)
#   PROTOC_GEN_SWIFT         protoc-gen-swift (swift-protobuf; default: on the PATH, else built
#                            from the Apple package's dependencies with `swift build`)
#   PROTOC_GEN_GRPC_SWIFT_2  protoc-gen-grpc-swift-2 (grpc-swift-protobuf; same default)
# The plugins must not be newer than the packages Apple/Package.swift resolves.
set -euo pipefail

kit="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$kit/../.." && pwd)"
out="$kit/Apple/Sources/FedCoreMLApple/Generated"

plugin() {  # plugin NAME ENV_VALUE: a path to the protoc plugin NAME
    local name="$1" given="$2"
    if [[ -n "$given" ]]; then
        echo "$given"
    elif command -v "$name" >/dev/null; then
        command -v "$name"
    else
        echo "building $name from the Apple package's dependencies..." >&2
        swift build --package-path "$kit/Apple" -c release --product "$name" >&2
        echo "$(swift build --package-path "$kit/Apple" -c release --show-bin-path)/$name"
    fi
}

if [[ -n "${PROTOC:-}" ]]; then
    read -r -a protoc <<<"$PROTOC"
elif command -v protoc >/dev/null; then
    protoc=(protoc)
else
    protoc=(python3 -m grpc_tools.protoc)
fi
gen_swift="$(plugin protoc-gen-swift "${PROTOC_GEN_SWIFT:-}")"
gen_grpc="$(plugin protoc-gen-grpc-swift-2 "${PROTOC_GEN_GRPC_SWIFT_2:-}")"
for tool in "$gen_swift" "$gen_grpc"; do
    [[ -x "$tool" ]] || { echo "generate-stubs.sh: $tool is not an executable" >&2; exit 1; }
done

mkdir -p "$out"
cd "$repo"
"${protoc[@]}" --proto_path=protos \
    --plugin=protoc-gen-swift="$gen_swift" \
    --swift_opt=Visibility=Internal,FileNaming=DropPath \
    --swift_out="$out" \
    --plugin=protoc-gen-grpc-swift-2="$gen_grpc" \
    --grpc-swift-2_opt=Visibility=Internal,Server=True,Client=True,FileNaming=DropPath \
    --grpc-swift-2_out="$out" \
    fedcoreml/v1/device.proto
echo "wrote $out/device.pb.swift and $out/device.grpc.swift"
