// The lines of the stdio bridge protocol (ios_bridge/stdio_bridge.py), one JSON object each.
//
// To the bridge:
//   {"id": 1, "call": "Register", "request": {...}, "metadata": [["k", "v"]], "timeoutMs": 60000}
//   {"id": 2, "call": "SubmitUpdate", "metadata": [...], "timeoutMs": ...}   opens a client stream
//   {"id": 2, "message": {...}}  a message of an open client stream; {"id": 2, "end": true} ends it
//   {"id": 2, "cancel": true}    cancels a call
//   {"id": 3, "call": "ModelParameters", "path": "/tmp/m.mlmodel"}   the tensors in a model file
// From the bridge:
//   {"id": 1, "response": {...}}                       the answer of a call
//   {"id": 2, "message": {...}} ... {"id": 2, "end": true}   a server stream
//   {"id": 1, "error": {"status": "UNAVAILABLE", "message": "...", "retryAfterMs": 250}}
//   {"id": 1, "bridgeError": "..."}                    the bridge could not make the call
// Messages are in the proto3 JSON mapping.
import FedCoreML
import Foundation

struct CallLine<Request: Encodable>: Encodable {
    let id: Int
    let call: String
    var request: Request?
    var metadata: [[String]]?
    var timeoutMs: Int64?
    var path: String?
}

struct MessageLine<Message: Encodable>: Encodable {
    let id: Int
    let message: Message
}

struct ControlLine: Encodable {
    let id: Int
    var end: Bool?
    var cancel: Bool?
}

struct Envelope: Decodable {
    let id: Int?
}

struct StatusBody: Decodable {
    let status: String
    let message: String?
    let retryAfterMs: Int64?
}

/// A reply line, decoded once the caller knows which message type it carries.
struct ReplyLine<Message: Decodable>: Decodable {
    let id: Int?
    let response: Message?
    let message: Message?
    let end: Bool?
    let error: StatusBody?
    let bridgeError: String?
}

/// The bridge could not make a call (a bad request line, a dead bridge process); no coordinator
/// answered. Not a ``RefusedError``: the agent does not retry it.
public struct BridgeError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "stdio bridge: \(message)" }
}

extension StatusBody {
    func refusal(_ rpc: RPC) -> RefusedError {
        RefusedError(
            rpc, StatusCode(name: status) ?? .unknown, message ?? "",
            retryAfter: retryAfterMs.map { .milliseconds(max($0, 0)) })
    }
}
