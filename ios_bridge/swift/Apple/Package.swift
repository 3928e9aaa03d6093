// swift-tools-version:6.0
// FedCoreMLApple: the Apple-platform adapters of the FedCoreML kit, a grpc-swift 2 transport and
// a Core ML trainer. A package of its own so that the Linux build of ../ (the core) never
// resolves grpc-swift or needs Core ML. Before the first build, generate the protocol stubs:
// ../generate-stubs.sh (see ../README.md).
import PackageDescription

let package = Package(
    name: "FedCoreMLApple",
    // grpc-swift 2 and its generated stubs need iOS 18 / macOS 15.
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "FedCoreMLApple", targets: ["FedCoreMLApple"])
    ],
    dependencies: [
        .package(path: ".."),  // the core package (its directory, and so its identity: "swift")
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.3.0"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.0.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.38.0"),
    ],
    targets: [
        .target(
            name: "FedCoreMLApple",
            dependencies: [
                .product(name: "FedCoreML", package: "swift"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(
                    name: "GRPCNIOTransportHTTP2TransportServices",
                    package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            exclude: ["Generated/README.md"]
        ),
        .testTarget(
            name: "FedCoreMLAppleTests",
            dependencies: [
                "FedCoreMLApple",
                .product(name: "GRPCInProcessTransport", package: "grpc-swift-2"),
            ]
        ),
    ]
)
