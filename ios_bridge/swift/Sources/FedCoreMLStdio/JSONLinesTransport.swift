// A DeviceTransport over newline-delimited proto3 JSON (BridgeLines.swift): what reaches a
// real coordinator from Linux, where no Swift gRPC package can be fetched, through
// ios_bridge/stdio_bridge.py, which makes the gRPC calls. Many calls may be in flight at once.
import FedCoreML
import Foundation

public final class JSONLinesTransport: DeviceTransport, @unchecked Sendable {
    private let input: FileHandle
    private let output: FileHandle
    private let lock = NSLock()  // guards the fields below and every write to `output`
    private var nextId = 1
    private var handlers: [Int: @Sendable (Data) -> Void] = [:]
    private var finished: Set<Int> = []  // calls cancelled or answered: send nothing more
    private var gone: BridgeError?

    /// Requests are written to `output`, replies read from `input` on a thread of its own.
    public init(input: FileHandle, output: FileHandle) {
        self.input = input
        self.output = output
        let reader = Thread { [self] in readLoop() }
        reader.name = "fedcoreml-bridge-reader"
        reader.start()
    }

    /// Closes the request side: the bridge cancels what is in flight and exits.
    public func close() {
        lock.lock()
        defer { lock.unlock() }
        try? output.close()
        if gone == nil { gone = BridgeError("the transport was closed") }
    }

    // MARK: DeviceTransport

    public func register(_ request: RegisterRequest, options: CallOptions) async throws
        -> RegisterResponse
    {
        try await unary(.register, request, options)
    }

    public func getTask(_ request: GetTaskRequest, options: CallOptions) async throws
        -> GetTaskResponse
    {
        try await unary(.getTask, request, options)
    }

    public func submitEvaluation(_ request: SubmitEvaluationRequest, options: CallOptions)
        async throws -> SubmitEvaluationResponse
    {
        try await unary(.submitEvaluation, request, options)
    }

    public func downloadModel(_ request: DownloadModelRequest, options: CallOptions)
        -> AsyncThrowingStream<ModelChunk, any Error>
    {
        AsyncThrowingStream { continuation in
            let id = open { [self] line, id in
                do {
                    let reply = try decode(ReplyLine<ModelChunk>.self, line)
                    if let message = reply.message {
                        continuation.yield(message)
                        return
                    }
                    finish(id)
                    if reply.end == true {
                        continuation.finish()
                    } else {
                        continuation.finish(throwing: try failure(reply, .downloadModel))
                    }
                } catch {
                    finish(id)
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { [self] termination in
                if case .cancelled = termination { cancel(id) }
            }
            do {
                try send(
                    CallLine(
                        id: id, call: RPC.downloadModel.rawValue, request: request,
                        metadata: Self.metadata(options), timeoutMs: Self.millis(options)))
            } catch {
                finish(id)
                continuation.finish(throwing: error)
            }
        }
    }

    public func submitUpdate<Chunks: AsyncSequence & Sendable>(
        _ chunks: Chunks, options: CallOptions
    ) async throws -> SubmitUpdateResponse where Chunks.Element == UpdateChunk {
        let reply = Reply()
        let id = openUnary(reply)
        return try await withTaskCancellationHandler {
            try send(
                CallLine<RegisterRequest>(
                    id: id, call: RPC.submitUpdate.rawValue, metadata: Self.metadata(options),
                    timeoutMs: Self.millis(options)))
            do {
                for try await chunk in chunks {
                    if reply.isResolved { break }  // answered early (refused): stop sending
                    try send(MessageLine(id: id, message: chunk))
                }
            } catch {
                cancel(id)  // never half-close a cut update
                throw error
            }
            try send(ControlLine(id: id, end: true))
            return try decodeResponse(await reply.value(), .submitUpdate)
        } onCancel: {
            cancel(id)
        }
    }

    // MARK: the bridge's helper

    /// The updatable tensors of the `.mlmodel` file at `path`, as the coordinator reads them.
    public func modelParameters(path: String) async throws -> [NamedTensor] {
        struct Entry: Decodable {
            let name: String
            let shape: [Int]
            let data: String
        }
        struct Listing: Decodable { let tensors: [Entry] }
        let reply = Reply()
        let id = openUnary(reply)
        try send(CallLine<RegisterRequest>(id: id, call: "ModelParameters", path: path))
        let line = try await reply.value()
        let decoded = try decode(ReplyLine<Listing>.self, line)
        guard let listing = decoded.response else {
            throw decoded.bridgeError.map(BridgeError.init)
                ?? BridgeError("ModelParameters answered without tensors")
        }
        return try listing.tensors.map { entry in
            guard let bytes = Data(base64Encoded: entry.data),
                let values = unpackFloat32LittleEndian(bytes)
            else { throw BridgeError("tensor \(entry.name): data is not base64 float32") }
            return try NamedTensor(name: entry.name, shape: entry.shape, values: values)
        }
    }

    // MARK: calls in flight

    private func unary<Request: ProtoMessage, Response: ProtoMessage>(
        _ rpc: RPC, _ request: Request, _ options: CallOptions
    ) async throws -> Response {
        let reply = Reply()
        let id = openUnary(reply)
        return try await withTaskCancellationHandler {
            try send(
                CallLine(
                    id: id, call: rpc.rawValue, request: request, metadata: Self.metadata(options),
                    timeoutMs: Self.millis(options)))
            return try decodeResponse(await reply.value(), rpc)
        } onCancel: {
            cancel(id)
        }
    }

    /// A new call id whose reply lines go to `handler` (on the reader thread).
    private func open(_ handler: @escaping @Sendable (Data, Int) -> Void) -> Int {
        lock.lock()
        defer { lock.unlock() }
        let id = nextId
        nextId += 1
        handlers[id] = { line in handler(line, id) }
        return id
    }

    private func openUnary(_ reply: Reply) -> Int {
        open { [self] line, id in
            finish(id)
            reply.resolve(.success(line))
        }
    }

    /// The call is over on this side: forget its handler, send nothing more for it.
    private func finish(_ id: Int) {
        lock.lock()
        defer { lock.unlock() }
        handlers[id] = nil
        finished.insert(id)
    }

    /// Cancels a call in flight: the bridge cancels the gRPC call, the caller gets
    /// CancellationError at once.
    private func cancel(_ id: Int) {
        lock.lock()
        let handler = handlers.removeValue(forKey: id)
        let wasOpen = !finished.contains(id)
        finished.insert(id)
        if wasOpen, gone == nil {
            try? output.write(contentsOf: Self.line(ControlLine(id: id, cancel: true)))
        }
        lock.unlock()
        handler?(Self.cancelledLine(id))
    }

    private func send<Line: Encodable>(_ value: Line) throws {
        let data = try Self.line(value)
        lock.lock()
        defer { lock.unlock() }
        if let gone { throw gone }
        if let id = (value as? any IdentifiedLine)?.lineId, finished.contains(id) {
            if Task.isCancelled { throw CancellationError() }
            return
        }
        do {
            try output.write(contentsOf: data)
        } catch {
            throw BridgeError("cannot write to the bridge process (\(error))")
        }
    }

    private func readLoop() {
        var buffer = Data()
        while true {
            let piece = input.availableData
            if piece.isEmpty { break }
            var searchFrom = buffer.count
            buffer.append(piece)
            while let newline = buffer[searchFrom...].firstIndex(of: 0x0A) {
                dispatch(Data(buffer[buffer.startIndex..<newline]))
                buffer = Data(buffer[(newline + 1)...])
                searchFrom = 0
            }
        }
        lock.lock()
        if gone == nil { gone = BridgeError("the bridge process closed its output (did it exit?)") }
        let error = gone!
        let waiting = handlers
        handlers = [:]
        lock.unlock()
        let line = Self.errorLine(error.message)
        for (id, handler) in waiting {
            _ = id
            handler(line)
        }
    }

    private func dispatch(_ line: Data) {
        guard let id = try? JSONDecoder().decode(Envelope.self, from: line).id else {
            FileHandle.standardError.write(
                Data("stdio bridge: a reply line without an id: ".utf8) + line.prefix(300)
                    + Data("\n".utf8))
            return
        }
        lock.lock()
        let handler = handlers[id]
        lock.unlock()
        handler?(line)
    }

    // MARK: lines

    private func decode<Value: Decodable>(_ type: Value.Type, _ line: Data) throws -> Value {
        do {
            return try JSONDecoder().decode(type, from: line)
        } catch let error as CancellationError {
            throw error
        } catch {
            throw BridgeError("unreadable reply (\(error))")
        }
    }

    private func decodeResponse<Response: ProtoMessage>(_ line: Data, _ rpc: RPC) throws
        -> Response
    {
        let reply = try decode(ReplyLine<Response>.self, line)
        if let response = reply.response { return response }
        throw try failure(reply, rpc)
    }

    private func failure<Message>(_ reply: ReplyLine<Message>, _ rpc: RPC) throws -> any Error {
        if let error = reply.error {
            if error.status == StatusCode.cancelled.name && Task.isCancelled {
                return CancellationError()
            }
            return error.refusal(rpc)
        }
        return BridgeError(reply.bridgeError ?? "a reply with neither response nor error")
    }

    private static func line<Line: Encodable>(_ value: Line) throws -> Data {
        try JSONEncoder().encode(value) + Data("\n".utf8)
    }

    private static func cancelledLine(_ id: Int) -> Data {
        Data(
            #"{"id":\#(id),"error":{"status":"CANCELLED","message":"cancelled by the caller"}}"#
                .utf8)
    }

    private static func errorLine(_ message: String) -> Data {
        let quoted = (try? JSONEncoder().encode(message)) ?? Data(#""bridge gone""#.utf8)
        return Data(#"{"bridgeError":"#.utf8) + quoted + Data("}".utf8)
    }

    private static func metadata(_ options: CallOptions) -> [[String]]? {
        options.metadata.isEmpty ? nil : options.metadata.map { [$0.key, $0.value] }
    }

    private static func millis(_ options: CallOptions) -> Int64 {
        Int64((options.timeout.seconds * 1000).rounded(.up))
    }
}

/// A request line of one call: nothing is sent for a call already cancelled or answered.
private protocol IdentifiedLine { var lineId: Int { get } }
extension CallLine: IdentifiedLine { var lineId: Int { id } }
extension MessageLine: IdentifiedLine { var lineId: Int { id } }
extension ControlLine: IdentifiedLine { var lineId: Int { id } }
