// An in-memory coordinator behind the DeviceTransport protocol, with the failure knobs of
// tests/fake_coordinator.py: each device gets its own copy of a script of GetTask answers, then
// RunFinished; models are served in chunks; updates are reassembled strictly.
import FedCoreML
import Foundation

/// An update as the fake received it.
struct ReceivedUpdate: Sendable {
    let header: UpdateHeader
    let tensors: [String: (shape: [UInt32], values: [Float])]
    let sliceSizes: [Int]
}

final class FakeTransport: DeviceTransport, @unchecked Sendable {
    private let lock = NSLock()
    private var script: [GetTaskResponse]
    private var scripts: [String: [GetTaskResponse]] = [:]
    private var sessions: [String: String] = [:]  // session id -> device id
    let models: [String: Data]
    var pacing = PacingHints(
        pollIntervalMs: 20, maxMessageBytes: 4 << 20, chunkBytes: 1 << 20,
        sessionTtlMs: 60_000, longPollMs: 2_000)
    var downloadChunk = 64 * 1024

    // failure injection
    var getTaskFaults: [StatusCode] = []
    var throttleGetTaskMs: [Int] = []
    var forgetSessions = 0
    var breakDownloads = 0  // cut this many downloads after their first chunk
    var corruptDownloads = 0  // flip a byte in this many downloads from offset 0
    var refuseSubmissions: StatusCode?
    /// Awaited after each update message received (before the next is read).
    var onUpdateMessage: (@Sendable (Int) async -> Void)?

    // what arrived
    private(set) var registrations: [RegisterRequest] = []
    private(set) var getTaskRequests: [GetTaskRequest] = []
    private(set) var getTaskOptions: [CallOptions] = []
    private(set) var downloadOffsets: [(task: String, offset: UInt64)] = []
    private(set) var updates: [String: ReceivedUpdate] = [:]
    private(set) var abortedUploads: [Int] = []  // messages received before the cut
    private(set) var evaluations: [String: SubmitEvaluationRequest] = [:]
    private(set) var metadataSeen: [[String]] = []

    init(script: [GetTaskResponse], models: [String: Data]) {
        self.script = script
        self.models = models
    }

    func locked<T>(_ body: (FakeTransport) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(self)
    }

    private func note(_ options: CallOptions) {
        metadataSeen.append(options.metadata.map { "\($0.key): \($0.value)" })
    }

    private func device(_ session: String, _ rpc: RPC) throws -> String {
        guard let device = sessions[session] else {
            throw RefusedError(rpc, .notFound, "unknown session '\(session)'")
        }
        return device
    }

    func register(_ request: RegisterRequest, options: CallOptions) async throws
        -> RegisterResponse
    {
        locked { fake in
            fake.note(options)
            fake.registrations.append(request)
            let session = "session-\(fake.registrations.count)"
            fake.sessions[session] = request.deviceId
            if fake.scripts[request.deviceId] == nil {
                fake.scripts[request.deviceId] = fake.script
            }
            return RegisterResponse(sessionId: session, pacing: fake.pacing)
        }
    }

    func getTask(_ request: GetTaskRequest, options: CallOptions) async throws -> GetTaskResponse {
        try locked { fake in
            fake.note(options)
            fake.getTaskRequests.append(request)
            fake.getTaskOptions.append(options)
            if !fake.throttleGetTaskMs.isEmpty {
                let millis = fake.throttleGetTaskMs.removeFirst()
                throw RefusedError(
                    .getTask, .resourceExhausted, "injected rate limit",
                    retryAfter: .milliseconds(millis))
            }
            if !fake.getTaskFaults.isEmpty {
                throw RefusedError(.getTask, fake.getTaskFaults.removeFirst(), "injected fault")
            }
            if fake.forgetSessions > 0 {
                fake.forgetSessions -= 1
                fake.sessions[request.sessionId] = nil
            }
            let device = try fake.device(request.sessionId, .getTask)
            if var mine = fake.scripts[device], !mine.isEmpty {
                let next = mine.removeFirst()
                fake.scripts[device] = mine
                return next
            }
            return GetTaskResponse(.finished(RunFinished(reason: "done")))
        }
    }

    func downloadModel(_ request: DownloadModelRequest, options: CallOptions)
        -> AsyncThrowingStream<ModelChunk, any Error>
    {
        AsyncThrowingStream { continuation in
            do {
                let (model, cut, digest) = try locked { fake in
                    fake.note(options)
                    _ = try fake.device(request.sessionId, .downloadModel)
                    guard var model = fake.models[request.taskId] else {
                        throw RefusedError(
                            .downloadModel, .notFound, "unknown task '\(request.taskId)'")
                    }
                    guard request.offset <= UInt64(model.count) else {
                        throw RefusedError(.downloadModel, .outOfRange, "offset past the end")
                    }
                    fake.downloadOffsets.append((request.taskId, request.offset))
                    let cut = fake.breakDownloads > 0
                    if cut { fake.breakDownloads -= 1 }
                    let digest = SHA256Digest.hex(of: model)
                    if fake.corruptDownloads > 0 && request.offset == 0 {
                        fake.corruptDownloads -= 1
                        model[0] ^= 0xFF
                    }
                    return (model, cut, digest)
                }
                var offset = Int(request.offset)
                while offset < model.count {
                    let end = min(offset + downloadChunk, model.count)
                    continuation.yield(
                        ModelChunk(
                            offset: UInt64(offset), data: model.subdata(in: offset..<end),
                            totalSize: UInt64(model.count), sha256: digest))
                    offset = end
                    if cut {
                        throw RefusedError(
                            .downloadModel, .unavailable, "injected: connection lost")
                    }
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    func submitUpdate<Chunks: AsyncSequence & Sendable>(_ chunks: Chunks, options: CallOptions)
        async throws -> SubmitUpdateResponse where Chunks.Element == UpdateChunk
    {
        var received: [UpdateChunk] = []
        do {
            for try await chunk in chunks {
                received.append(chunk)
                if received.count == 1, let status = refuseSubmissions {
                    throw RefusedError(.submitUpdate, status, "injected refusal")
                }
                await onUpdateMessage?(received.count)
            }
        } catch let refusal as RefusedError {
            throw refusal
        } catch {
            locked { $0.abortedUploads.append(received.count) }
            throw error
        }
        return try locked { fake in
            fake.note(options)
            let update = try Self.reassemble(received)
            _ = try fake.device(update.header.sessionId, .submitUpdate)
            guard fake.updates[update.header.taskId] == nil else {
                throw RefusedError(.submitUpdate, .failedPrecondition, "task already submitted")
            }
            fake.updates[update.header.taskId] = update
            return SubmitUpdateResponse(accepted: true, round: 1)
        }
    }

    func submitEvaluation(_ request: SubmitEvaluationRequest, options: CallOptions) async throws
        -> SubmitEvaluationResponse
    {
        try locked { fake in
            fake.note(options)
            _ = try fake.device(request.sessionId, .submitEvaluation)
            if let status = fake.refuseSubmissions {
                throw RefusedError(.submitEvaluation, status, "injected refusal")
            }
            fake.evaluations[request.taskId] = request
            return SubmitEvaluationResponse(accepted: true)
        }
    }

    /// The strict reading of an update stream (tensor_codec.decode_update's rules).
    static func reassemble(_ messages: [UpdateChunk]) throws -> ReceivedUpdate {
        func refuse(_ message: String) -> RefusedError {
            RefusedError(.submitUpdate, .invalidArgument, message)
        }
        guard case .header(let header)? = messages.first?.part else {
            throw refuse("the first message must be the update header")
        }
        var tensors: [String: (shape: [UInt32], values: [Float])] = [:]
        var bytes: [String: Data] = [:]
        var order: [String] = []
        var sizes: [Int] = []
        for message in messages.dropFirst() {
            guard case .tensor(let slice)? = message.part else {
                throw refuse("a second header, or an empty message")
            }
            if bytes[slice.name] == nil {
                guard !order.contains(slice.name) else { throw refuse("tensor sent twice") }
                order.append(slice.name)
                bytes[slice.name] = Data()
                tensors[slice.name] = (slice.shape, [])
            }
            guard order.last == slice.name else { throw refuse("tensors interleaved") }
            guard slice.offset == UInt64(bytes[slice.name]!.count) else {
                throw refuse("slice out of order")
            }
            guard slice.data.count % 4 == 0 else { throw refuse("misaligned slice") }
            bytes[slice.name]!.append(slice.data)
            sizes.append(slice.data.count)
        }
        guard header.numTensors == UInt32(order.count) else {
            throw refuse(
                "the header announces \(header.numTensors) tensors but \(order.count) arrived")
        }
        for name in order {
            let shape = tensors[name]!.shape
            let values = unpackFloat32LittleEndian(bytes[name]!)!
            guard values.count == shape.reduce(1, { $0 * Int($1) }) else {
                throw refuse("tensor \(name): byte length does not match shape")
            }
            tensors[name] = (shape, values)
        }
        return ReceivedUpdate(header: header, tensors: tensors, sliceSizes: sizes)
    }
}
