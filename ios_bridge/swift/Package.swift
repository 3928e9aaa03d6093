// swift-tools-version:6.0
// FedCoreML: the device side of the fedcoreml protocol for iOS apps (see README.md).
//
// This package builds on Linux and Apple platforms with Foundation only (plus the system's
// libcrypto on Linux for SHA-256). The Apple-only adapters (grpc-swift transport, Core ML
// trainer) live in the separate package Apple/, which the Linux build never resolves.
import PackageDescription

let package = Package(
    name: "FedCoreML",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "FedCoreML", targets: ["FedCoreML"]),
        .library(name: "FedCoreMLStdio", targets: ["FedCoreMLStdio"]),
    ],
    targets: [
        // OpenSSL's libcrypto (Debian: libssl-dev) for SHA-256 where CryptoKit does not exist.
        .systemLibrary(
            name: "CLibcrypto",
            path: "Sources/CLibcrypto",
            pkgConfig: "libcrypto",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(
            name: "FedCoreML",
            dependencies: [.target(name: "CLibcrypto", condition: .when(platforms: [.linux]))]
        ),
        // A DeviceTransport over newline-delimited proto3 JSON (the stdio bridge to Python).
        .target(name: "FedCoreMLStdio", dependencies: ["FedCoreML"]),
        .testTarget(name: "FedCoreMLTests", dependencies: ["FedCoreML"]),
        .testTarget(
            name: "FedCoreMLEndToEndTests",
            dependencies: ["FedCoreML", "FedCoreMLStdio"]
        ),
    ]
)
