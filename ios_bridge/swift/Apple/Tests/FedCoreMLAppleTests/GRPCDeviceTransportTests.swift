// GRPCDeviceTransport against a fake coordinator served in process by grpc-swift 2 itself
// (GRPCInProcessTransport and the generated server stubs): messages cross both ways intact,
// refusals keep their status, message and retry-after, and a cancelled submission is cancelled
// on the wire. Runs wherever the Apple package builds (`swift test --package-path Apple`).
import FedCoreML
import Foundation
import GRPCCore
import GRPCInProcessTransport
import Testing

@testable import FedCoreMLApple

/// Counts and records what the fake coordinator saw.
private final class Seen: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [String: Int] = [:]
    private var update: [String: [Float]] = [:]
    private var tokens: [String] = []

    func count(_ key: String) { lock.withLock { values[key, default: 0] += 1 } }
    subscript(key: String) -> Int { lock.withLock { values[key, default: 0] } }
    func store(_ name: String, _ values: [Float]) {
        lock.withLock { update[name, default: []] += values }
    }
    var tensors: [String: [Float]] { lock.withLock { update } }
    func token(_ value: String) { lock.withLock { tokens.append(value) } }
    var seenTokens: [String] { lock.withLock { tokens } }
}

/// Records the authorization metadata of every call.
private struct TokenRecorder: ServerInterceptor {
    let seen: Seen

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next:
            @Sendable (StreamingServerRequest<Input>, ServerContext) async throws
            -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let tokens = Array(request.metadata[stringValues: authorizationKey])
        seen.token(tokens.isEmpty ? "(none)" : tokens.joined(separator: ","))
        return try await next(request, context)
    }
}

private let model = Data((0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })

/// A coordinator that throttles the first GetTask, hands out one train task, then finishes.
private struct FakeCoordinator: Fedcoreml_DeviceService.SimpleServiceProtocol {
    let seen: Seen

    func register(request: Fedcoreml_RegisterRequest, context: ServerContext) async throws
        -> Fedcoreml_RegisterResponse
    {
        return .with {
            $0.sessionID = "session-\(request.deviceID)"
            $0.pacing = .with {
                $0.chunkBytes = 1000; $0.pollIntervalMs = 10
            }
        }
    }

    func getTask(request: Fedcoreml_GetTaskRequest, context: ServerContext) async throws
        -> Fedcoreml_GetTaskResponse
    {
        seen.count("getTask")
        switch seen["getTask"] {
        case 1:
            throw RPCError(
                code: .resourceExhausted, message: "rate limit", metadata: [retryAfterKey: "250"])
        case 2:
            return .with {
                $0.train = .with {
                    $0.taskID = "t1"
                    $0.round = 1
                    $0.model = .with {
                        $0.sha256 = SHA256Digest.hex(of: model)
                        $0.sizeBytes = UInt64(model.count)
                    }
                }
            }
        default:
            return .with { $0.finished = .with { $0.reason = "done" } }
        }
    }

    func downloadModel(
        request: Fedcoreml_DownloadModelRequest, response: RPCWriter<Fedcoreml_ModelChunk>,
        context: ServerContext
    ) async throws {
        guard request.taskID == "t1" else {
            throw RPCError(code: .notFound, message: "unknown task '\(request.taskID)'")
        }
        var offset = Int(request.offset)
        while offset < model.count {
            let end = min(offset + 4096, model.count)
            try await response.write(
                .with {
                    $0.offset = UInt64(offset)
                    $0.data = model.subdata(in: offset..<end)
                    $0.totalSize = UInt64(model.count)
                })
            offset = end
        }
    }

    func submitUpdate(
        request: RPCAsyncSequence<Fedcoreml_UpdateChunk, any Error>, context: ServerContext
    ) async throws -> Fedcoreml_SubmitUpdateResponse {
        var received: [(String, [Float])] = []
        do {
            for try await chunk in request {
                if case .tensor(let slice)? = chunk.part {
                    received.append((slice.name, unpackFloat32LittleEndian(slice.data) ?? []))
                }
            }
        } catch {
            seen.count("cutUploads")
            throw error
        }
        for (name, values) in received { seen.store(name, values) }
        seen.count("updates")
        return .with {
            $0.accepted = true; $0.round = 1
        }
    }

    func submitEvaluation(request: Fedcoreml_SubmitEvaluationRequest, context: ServerContext)
        async throws -> Fedcoreml_SubmitEvaluationResponse
    {
        .with { $0.accepted = true }
    }
}

private struct Trainer: ModelTrainer {
    let tensors: [NamedTensor]
    func train(modelFile: URL, task: TrainTask) async throws -> TrainResult {
        TrainResult(tensors: tensors, numExamples: 10, loss: 0.5, accuracy: 0.5, seconds: 1)
    }
    func evaluate(modelFile: URL, task: EvaluateTask) async throws -> EvaluationResult {
        EvaluationResult(numExamples: 10, loss: 0.5, accuracy: 0.5)
    }
}

/// Sleeps return at once (the waits are the agent's business, not this test's).
private struct InstantClock: AgentClock {
    func now() -> Duration { .zero }
    func sleep(for duration: Duration) async throws { try Task.checkCancellation() }
}

/// Serves the fake in process for the duration of `body`.
private func withCoordinator(
    _ body: (GRPCDeviceTransport<InProcessTransport.Client>, Seen) async throws -> Void
) async throws {
    let seen = Seen()
    let inProcess = InProcessTransport()
    let server = GRPCServer(
        transport: inProcess.server, services: [FakeCoordinator(seen: seen)],
        interceptors: [TokenRecorder(seen: seen)])
    let serving = Task { try await server.serve() }
    let transport = GRPCDeviceTransport(transport: inProcess.client)
    defer {
        transport.close()
        server.beginGracefulShutdown()
        serving.cancel()
    }
    try await body(transport, seen)
}

@Suite struct GRPCDeviceTransportTests {
    let tensors = [
        try! NamedTensor(
            name: "fc.weights", shape: [3, 700], values: (0..<2100).map { Float($0) }),
        try! NamedTensor(name: "fc.bias", shape: [3], values: [0.5, -1, 2]),
    ]

    @Test func anAgentRunsATaskOverGRPCSwift() async throws {
        try await withCoordinator { transport, seen in
            let log = EventLog()
            let agent = DeviceAgent(
                transport: transport, trainer: Trainer(tensors: tensors),
                configuration: AgentConfiguration(deviceId: "phone-1", token: "fcm_x"),
                clock: InstantClock(), onEvent: log.record)
            let stats = try await agent.run()

            #expect(stats.finished && stats.tasksTrained == 1 && stats.throttled == 1)
            #expect(log.events.contains(.slept(.milliseconds(250), .throttled)))
            #expect(seen["updates"] == 1 && seen["cutUploads"] == 0)
            for tensor in tensors { #expect(seen.tensors[tensor.name] == tensor.values) }
            #expect(!seen.seenTokens.isEmpty && seen.seenTokens.allSatisfy { $0 == "Bearer fcm_x" })
        }
    }

    @Test func refusalsKeepTheirStatusMessageAndRetryAfter() async throws {
        try await withCoordinator { transport, _ in
            let options = FedCoreML.CallOptions(timeout: .seconds(10))
            let throttled = await #expect(throws: RefusedError.self) {
                try await transport.getTask(GetTaskRequest(), options: options)
            }
            #expect(
                throttled
                    == RefusedError(
                        .getTask, .resourceExhausted, "rate limit", retryAfter: .milliseconds(250)))
            let missing = await #expect(throws: RefusedError.self) {
                for try await _ in transport.downloadModel(
                    DownloadModelRequest(sessionId: "s", taskId: "x"), options: options)
                {}
            }
            #expect(missing == RefusedError(.downloadModel, .notFound, "unknown task 'x'"))
        }
    }

    @Test func aCancelledSubmissionIsCancelledOnTheWire() async throws {
        try await withCoordinator { transport, seen in
            let messages = try UpdateMessages(
                header: UpdateHeader(), tensors: tensors, chunkBytes: 400)
            let stalled = AsyncStream<Void>.makeStream()
            let submit = Task {
                try await transport.submitUpdate(
                    Stalled(base: messages, after: 2, stalled: stalled.continuation),
                    options: FedCoreML.CallOptions(timeout: .seconds(30)))
            }
            var iterator = stalled.stream.makeAsyncIterator()
            await iterator.next()
            submit.cancel()
            await #expect(throws: CancellationError.self) { try await submit.value }
            let deadline = ContinuousClock.now + .seconds(10)
            while seen["cutUploads"] == 0, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            // The coordinator saw the request stream fail, not end: no update, however short.
            #expect(seen["updates"] == 0 && seen["cutUploads"] == 1)
        }
    }
}

/// Yields `after` messages, then waits for cancellation.
private struct Stalled: AsyncSequence, Sendable {
    typealias Element = UpdateChunk
    let base: UpdateMessages
    let after: Int
    let stalled: AsyncStream<Void>.Continuation

    struct AsyncIterator: AsyncIteratorProtocol {
        var base: UpdateMessages.AsyncIterator
        var left: Int
        let stalled: AsyncStream<Void>.Continuation

        mutating func next() async throws -> UpdateChunk? {
            if left == 0 {
                stalled.yield()
                try await Task.sleep(for: .seconds(60))
            }
            left -= 1
            return try await base.next()
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: base.makeAsyncIterator(), left: after, stalled: stalled)
    }
}

/// Collects an agent's events.
private final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var recorded: [AgentEvent] = []
    func record(_ event: AgentEvent) { lock.withLock { recorded.append(event) } }
    var events: [AgentEvent] { lock.withLock { recorded } }
}
