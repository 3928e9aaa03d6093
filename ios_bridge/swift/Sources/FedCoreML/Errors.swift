// Every way a call or a task can fail, as typed errors: a refusal carries its gRPC status and
// the coordinator's message (protos/README.md lists them); the others say what the device
// itself found wrong. Mirrors the error classes of ios_bridge/device_client.py.
import Foundation

/// The gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
public enum StatusCode: Int, Sendable, CaseIterable, Codable {
    case ok = 0
    case cancelled = 1
    case unknown = 2
    case invalidArgument = 3
    case deadlineExceeded = 4
    case notFound = 5
    case alreadyExists = 6
    case permissionDenied = 7
    case resourceExhausted = 8
    case failedPrecondition = 9
    case aborted = 10
    case outOfRange = 11
    case unimplemented = 12
    case `internal` = 13
    case unavailable = 14
    case dataLoss = 15
    case unauthenticated = 16

    /// The canonical name, as gRPC spells it: "INVALID_ARGUMENT".
    public var name: String {
        switch self {
        case .ok: "OK"
        case .cancelled: "CANCELLED"
        case .unknown: "UNKNOWN"
        case .invalidArgument: "INVALID_ARGUMENT"
        case .deadlineExceeded: "DEADLINE_EXCEEDED"
        case .notFound: "NOT_FOUND"
        case .alreadyExists: "ALREADY_EXISTS"
        case .permissionDenied: "PERMISSION_DENIED"
        case .resourceExhausted: "RESOURCE_EXHAUSTED"
        case .failedPrecondition: "FAILED_PRECONDITION"
        case .aborted: "ABORTED"
        case .outOfRange: "OUT_OF_RANGE"
        case .unimplemented: "UNIMPLEMENTED"
        case .internal: "INTERNAL"
        case .unavailable: "UNAVAILABLE"
        case .dataLoss: "DATA_LOSS"
        case .unauthenticated: "UNAUTHENTICATED"
        }
    }

    /// The code named `name` ("NOT_FOUND"), or nil.
    public init?(name: String) {
        guard let code = Self.allCases.first(where: { $0.name == name }) else { return nil }
        self = code
    }
}

/// The five calls of `DeviceService`.
public enum RPC: String, Sendable, CaseIterable {
    case register = "Register"
    case getTask = "GetTask"
    case downloadModel = "DownloadModel"
    case submitUpdate = "SubmitUpdate"
    case submitEvaluation = "SubmitEvaluation"
}

/// The coordinator (or the way to it) answered a call with a non-OK status.
///
/// `status` says what kind of refusal it is, `message` what exactly is wrong, in the
/// coordinator's words; `retryAfter` is the wait a rate limit asked for (`RESOURCE_EXHAUSTED`
/// with the trailing metadata `retry-after-ms`), nil otherwise.
public struct RefusedError: Error, Sendable, Equatable, CustomStringConvertible {
    public let rpc: RPC
    public let status: StatusCode
    public let message: String
    public let retryAfter: Duration?

    public init(_ rpc: RPC, _ status: StatusCode, _ message: String, retryAfter: Duration? = nil) {
        self.rpc = rpc
        self.status = status
        self.message = message
        self.retryAfter = retryAfter
    }

    public var description: String { "\(rpc.rawValue) refused (\(status.name)): \(message)" }

    /// The coordinator is unreachable or restarting: retry the same call with backoff.
    public var isTransient: Bool { status == .unavailable || status == .deadlineExceeded }

    /// Over the device's rate limit: send the same call again after `retryAfter`.
    public var isThrottled: Bool { status == .resourceExhausted && retryAfter != nil }

    /// The task is no longer this device's to do: drop it and ask for the next one.
    public var isTaskGone: Bool {
        status == .notFound || status == .failedPrecondition || status == .permissionDenied
    }
}

/// A downloaded model whose size or sha256 is not what the task announced.
public struct ModelVerificationError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The coordinator stayed unreachable for `RetryPolicy.giveUpAfter`.
public struct GaveUpError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public let lastRefusal: RefusedError
    public init(_ message: String, lastRefusal: RefusedError) {
        self.message = message
        self.lastRefusal = lastRefusal
    }
    public var description: String { message }
}

/// Thrown by a trainer to give up the current task: nothing is submitted and work goes on.
public struct TaskAbandonedError: Error, Sendable, Equatable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The device cannot go on: the coordinator keeps forgetting its session, or answered a
/// call in a way the protocol does not allow.
public struct ProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
