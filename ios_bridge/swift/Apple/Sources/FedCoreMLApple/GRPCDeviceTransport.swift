// DeviceTransport over grpc-swift 2 (HTTP/2 on Network.framework), with the stubs
// ../../generate-stubs.sh generates from protos/fedcoreml/v1/device.proto. Messages cross between
// the kit's types and swift-protobuf's through the proto3 JSON mapping both implement.
//
// Documentation followed (grpc-swift-2 2.4, grpc-swift-nio-transport 2.x, grpc-swift-protobuf
// 2.4, swift-protobuf 1.38: their sources' doc comments and DocC articles):
// [T] HTTP2ClientTransport.TransportServices(target:transportSecurity:) and
//     TransportSecurity.tls(configure:) with
//     TLS.trustRoots = .certificates([.bytes(_, format: .der)])
//     ("custom certificates must be DER-encoded"): grpc-swift-nio-transport,
//     Sources/GRPCNIOTransportHTTP2TransportServices/{HTTP2ClientTransport+TransportServices,
//     Config+TLS}.swift; TLSConfig.TrustRootsSource / CertificateSource in GRPCNIOTransportCore.
// [C] GRPCClient(transport:), runConnections(), beginGracefulShutdown(): grpc-swift-2,
//     Sources/GRPCCore/GRPCClient.swift.
// [G] Fedcoreml_DeviceService.Client(wrapping:) and its methods `rpc(_:metadata:options:
//     onResponse:)`, `rpc(metadata:options:requestProducer:onResponse:)`: grpc-swift-protobuf,
//     "Understanding the generated code" (service namespace `{swift_prefix}{Service}`) and
//     grpc-swift-2's StructuredSwift+Client.swift (the exploded client methods).
// [S] StreamingClientResponse.messages (server stream) and StreamingClientRequest's producer
//     ("if the producer throws an error, then gRPC will cancel the RPC"): grpc-swift-2,
//     Sources/GRPCCore/Call/Client/{ClientResponse,ClientRequest}.swift; Examples/route-guide.
// [O] CallOptions.timeout / maxRequestMessageBytes / maxResponseMessageBytes: grpc-swift-2,
//     Sources/GRPCCore/Call/Client/CallOptions.swift.
// [E] RPCError.code / .message / .metadata ("the client receives that metadata"), Metadata
//     addString(_:forKey:) and subscript(stringValues:): grpc-swift-2, Sources/GRPCCore/
//     {RPCError,Metadata}.swift.
// [J] Message.jsonUTF8Data() and init(jsonUTF8Data:options:): swift-protobuf,
//     Sources/SwiftProtobuf/Message+JSONAdditions{,_Data}.swift.
import FedCoreML
import Foundation
import GRPCCore
import SwiftProtobuf

#if canImport(Network)
    import GRPCNIOTransportHTTP2TransportServices
#endif

/// The five RPCs over a grpc-swift 2 client on any client transport: on an iPhone, HTTP/2 on
/// Network.framework (``init(host:port:caCertificateDER:)``).
@available(iOS 18.0, macOS 15.0, *)
public final class GRPCDeviceTransport<Transport: ClientTransport>: DeviceTransport {
    private let client: GRPCClient<Transport>
    private let stub: Fedcoreml_DeviceService.Client<Transport>
    private let connections: Task<Void, Never>

    /// Runs a gRPC client over `transport` until ``close()``.
    public init(transport: Transport) {
        let client = GRPCClient(transport: transport)  // [C]
        self.client = client
        stub = Fedcoreml_DeviceService.Client(wrapping: client)  // [G]
        connections = Task { try? await client.runConnections() }  // [C]
    }

    /// Stops accepting calls; those in flight finish.
    public func close() { client.beginGracefulShutdown() }  // [C]

    deinit { client.beginGracefulShutdown() }

    public func register(_ request: RegisterRequest, options: FedCoreML.CallOptions) async throws
        -> RegisterResponse
    {
        let message: Fedcoreml_RegisterRequest = try wire(request)
        return try await unary(.register) {  // [G]
            try await self.stub.register(
                message, metadata: metadata(options), options: grpc(options))
        }
    }

    public func getTask(_ request: GetTaskRequest, options: FedCoreML.CallOptions) async throws
        -> GetTaskResponse
    {
        let message: Fedcoreml_GetTaskRequest = try wire(request)
        return try await unary(.getTask) {  // [G]
            try await self.stub.getTask(
                message, metadata: metadata(options), options: grpc(options))
        }
    }

    public func submitEvaluation(_ request: SubmitEvaluationRequest, options: FedCoreML.CallOptions)
        async throws -> SubmitEvaluationResponse
    {
        let message: Fedcoreml_SubmitEvaluationRequest = try wire(request)
        return try await unary(.submitEvaluation) {  // [G]
            try await self.stub.submitEvaluation(
                message, metadata: metadata(options), options: grpc(options))
        }
    }

    public func downloadModel(_ request: DownloadModelRequest, options: FedCoreML.CallOptions)
        -> AsyncThrowingStream<ModelChunk, any Error>
    {
        AsyncThrowingStream { continuation in
            let call = Task {
                do {
                    let message: Fedcoreml_DownloadModelRequest = try wire(request)
                    try await self.stub.downloadModel(  // [G]
                        message, metadata: metadata(options), options: grpc(options)
                    ) { response in
                        for try await chunk in response.messages {  // [S]
                            // [J]
                            continuation.yield(try ModelChunk(jsonData: chunk.jsonUTF8Data()))
                        }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: refusal(.downloadModel, error))
                }
            }
            continuation.onTermination = { _ in call.cancel() }  // the reader went away
        }
    }

    public func submitUpdate<Chunks: AsyncSequence & Sendable>(
        _ chunks: Chunks, options: FedCoreML.CallOptions
    ) async throws -> SubmitUpdateResponse where Chunks.Element == UpdateChunk {
        // The RPC runs in a task of its own, fed through a stream, so that a cut update reaches
        // the transport only as a request producer that throws, which cancels the RPC [S]. If
        // the caller's cancellation reached the transport directly, a transport could end the
        // request stream cleanly first (grpc-swift's in-process transport does), and the
        // coordinator would see a short update as complete.
        let (feed, feeder) = AsyncThrowingStream<UpdateChunk, any Error>.makeStream()
        let written = Flag()
        let call = Task {
            try await self.unary(.submitUpdate) {
                try await self.stub.submitUpdate(  // [G]
                    metadata: metadata(options), options: grpc(options)
                ) { writer in
                    for try await chunk in feed {
                        try await writer.write(try wire(chunk) as Fedcoreml_UpdateChunk)
                    }
                    written.set()
                }
            } as SubmitUpdateResponse
        }
        do {
            for try await chunk in chunks { feeder.yield(chunk) }
            feeder.finish()
        } catch {
            feeder.finish(throwing: UpdateCut())
            _ = await call.result
            throw error
        }
        // Cancel the call only once the whole update is written (cancelling then may or may not
        // beat the answer); before that, the caller waits for the answer.
        return try await withTaskCancellationHandler {
            try await call.value
        } onCancel: {
            if written.isSet { call.cancel() }
        }
    }

    /// Runs a call whose answer is one message, as a kit message; failures as RefusedError.
    private func unary<Answer: SwiftProtobuf.Message, Reply: ProtoMessage>(
        _ rpc: RPC, _ body: () async throws -> Answer
    ) async throws -> Reply {
        do {
            let answer = try await body()
            return try Reply(jsonData: answer.jsonUTF8Data())  // [J]
        } catch {
            throw refusal(rpc, error)
        }
    }
}

#if canImport(Network)
    @available(iOS 18.0, macOS 15.0, *)
    extension GRPCDeviceTransport where Transport == HTTP2ClientTransport.TransportServices {
        /// A channel to the coordinator at `host:port`: TLS trusting `caCertificateDER` (the CA
        /// of deploy/make-certs.py, converted to DER), or plaintext when nil (a trusted LAN only).
        public convenience init(host: String, port: Int, caCertificateDER: Data?) throws {
            let security: Transport.TransportSecurity
            if let der = caCertificateDER {
                security = .tls {  // [T]
                    $0.trustRoots = .certificates([.bytes(Array(der), format: .der)])
                }
            } else {
                security = .plaintext  // [T]
            }
            self.init(
                transport: try Transport(  // [T]
                    target: .dns(host: host, port: port), transportSecurity: security))
        }
    }
#endif

/// Ends a request stream whose update was cut short (never a clean end).
private struct UpdateCut: Error {}

/// Set once, read from any task.
private final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// A kit message as its swift-protobuf twin, through the proto3 JSON mapping. [J]
private func wire<Kit: ProtoMessage, Wire: SwiftProtobuf.Message>(_ message: Kit) throws -> Wire {
    try Wire(jsonUTF8Data: message.jsonData())
}

/// The kit's call metadata (the bearer token) as gRPC metadata. [E]
private func metadata(_ options: FedCoreML.CallOptions) -> Metadata {
    var metadata = Metadata()
    for (key, value) in options.metadata { metadata.addString(value, forKey: key) }
    return metadata
}

/// The call's deadline, and the 4 MiB message limit both ways. [O]
private func grpc(_ options: FedCoreML.CallOptions) -> GRPCCore.CallOptions {
    var grpc = GRPCCore.CallOptions.defaults
    grpc.timeout = options.timeout
    grpc.maxRequestMessageBytes = maxMessageBytes
    grpc.maxResponseMessageBytes = maxMessageBytes
    return grpc
}

/// An RPCError as the kit's typed refusal, with the rate limit's retry-after. [E]
private func refusal(_ rpc: RPC, _ error: any Error) -> any Error {
    guard let error = error as? RPCError else { return error }
    if error.code == .cancelled, Task.isCancelled { return CancellationError() }
    let retryAfter = error.metadata[stringValues: retryAfterKey].first { _ in true }
        .flatMap { Int64($0) }.map { Duration.milliseconds(max($0, 0)) }
    return RefusedError(
        rpc, StatusCode(rawValue: error.code.rawValue) ?? .unknown, error.message,
        retryAfter: retryAfter)
}
