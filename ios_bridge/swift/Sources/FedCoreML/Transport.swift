// How a device reaches the coordinator: the five RPCs of `DeviceService`, whatever carries them
// (grpc-swift on an iPhone, the stdio bridge on Linux, an in-memory fake in tests).
import Foundation

/// Per-call settings: how long the call may take, and the metadata it carries.
public struct CallOptions: Sendable, Equatable {
    /// The call fails with `DEADLINE_EXCEEDED` after this long.
    public var timeout: Duration
    /// Call metadata, e.g. `authorization: Bearer <token>`.
    public var metadata: [(key: String, value: String)]

    public init(timeout: Duration, metadata: [(key: String, value: String)] = []) {
        self.timeout = timeout
        self.metadata = metadata
    }

    public static func == (lhs: CallOptions, rhs: CallOptions) -> Bool {
        lhs.timeout == rhs.timeout
            && lhs.metadata.map { [$0.key, $0.value] } == rhs.metadata.map { [$0.key, $0.value] }
    }
}

/// Call metadata key that carries `Bearer <token>` on every RPC when tokens are required.
public let authorizationKey = "authorization"
/// Trailing metadata key of a `RESOURCE_EXHAUSTED` answer: milliseconds to wait.
public let retryAfterKey = "retry-after-ms"
/// Every message either way is at most this long (grpc-swift's default receive limit).
public let maxMessageBytes = 4 * 1024 * 1024
/// Preferred payload of one tensor or model chunk.
public let defaultChunkBytes = 1024 * 1024

/// The five calls of `DeviceService` (protos/fedcoreml/v1/device.proto).
///
/// A call that ends with a non-OK status throws ``RefusedError`` (with `retryAfter` set from the
/// trailing metadata `retry-after-ms`); a cancelled caller's call is cancelled on the wire and
/// throws `CancellationError`. A transport does not retry: ``DeviceAgent`` applies the
/// protocol's retry rules.
public protocol DeviceTransport: Sendable {
    func register(_ request: RegisterRequest, options: CallOptions) async throws
        -> RegisterResponse

    func getTask(_ request: GetTaskRequest, options: CallOptions) async throws -> GetTaskResponse

    /// The model's chunks from `request.offset` to the end, as the server sends them. Ending the
    /// iteration early (or cancelling the iterating task) cancels the call.
    func downloadModel(_ request: DownloadModelRequest, options: CallOptions)
        -> AsyncThrowingStream<ModelChunk, any Error>

    /// Streams `chunks` (header first) and returns the answer. If iterating `chunks` throws, the
    /// call is cancelled, never half-closed: a server must not see a cut update as complete.
    func submitUpdate<Chunks: AsyncSequence & Sendable>(_ chunks: Chunks, options: CallOptions)
        async throws -> SubmitUpdateResponse where Chunks.Element == UpdateChunk

    func submitEvaluation(_ request: SubmitEvaluationRequest, options: CallOptions) async throws
        -> SubmitEvaluationResponse
}

/// Call metadata that authenticates as the holder of `token`.
public func bearerMetadata(_ token: String) -> [(key: String, value: String)] {
    [(authorizationKey, "Bearer \(token)")]
}

/// A device id: 1-128 of ASCII letters, digits and `. _ : -` (a UUID, `sim-000`, ...).
public let deviceIdRule = "1-128 characters from A-Z a-z 0-9 . _ : -"

/// Whether `deviceId` follows ``deviceIdRule`` (the coordinator refuses others).
public func isValidDeviceId(_ deviceId: String) -> Bool {
    let allowed = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-".utf8)
    return (1...128).contains(deviceId.utf8.count) && deviceId.utf8.allSatisfy(allowed.contains)
}
