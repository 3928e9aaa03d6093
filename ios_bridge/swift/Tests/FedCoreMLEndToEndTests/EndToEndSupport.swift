// What the end-to-end tests put around the agents: a deterministic trainer, a transport
// decorator that injects faults and records timings, and the examples-weighted mean check.
import FedCoreML
import FedCoreMLStdio
import Foundation

/// Trains "deterministically": the received parameters (read from the downloaded model file
/// through the bridge, as the coordinator reads them) plus an offset that depends on the device
/// and the round; remembers what it returned per task.
final class OffsetTrainer: ModelTrainer, @unchecked Sendable {
    let bridge: JSONLinesTransport
    let device: Int
    private let lock = NSLock()
    private var results: [String: (round: UInt32, result: TrainResult)] = [:]

    init(bridge: JSONLinesTransport, device: Int) {
        self.bridge = bridge
        self.device = device
    }

    static func offset(device: Int, round: UInt32) -> Float {
        Float(device + 1) * 0.001 + Float(round) * 0.0001
    }

    static func examples(device: Int, round: UInt32) -> Int { 100 * (device + 1) + Int(round) }

    func train(modelFile: URL, task: TrainTask) async throws -> TrainResult {
        let received = try await bridge.modelParameters(path: modelFile.path)
        let offset = Self.offset(device: device, round: task.round)
        let tensors = try received.map {
            try NamedTensor(name: $0.name, shape: $0.shape, values: $0.values.map { $0 + offset })
        }
        let result = TrainResult(
            tensors: tensors, numExamples: Self.examples(device: device, round: task.round),
            loss: 1 / Float(task.round + 1), accuracy: 0.5, seconds: 0.1)
        lock.withLock { results[task.taskId] = (task.round, result) }
        return result
    }

    func evaluate(modelFile: URL, task: EvaluateTask) async throws -> EvaluationResult {
        EvaluationResult(numExamples: 20 + device, loss: 0.9, accuracy: 0.5)
    }

    func result(of taskId: String) -> (round: UInt32, result: TrainResult)? {
        lock.withLock { results[taskId] }
    }
}

/// Wraps a transport: cuts or corrupts downloads on demand and records every GetTask's time.
final class FaultyTransport: DeviceTransport, @unchecked Sendable {
    struct Poll {
        let start: ContinuousClock.Instant
        let end: ContinuousClock.Instant
        let answer: GetTaskResponse?
    }

    let base: any DeviceTransport
    private let lock = NSLock()
    private var cutsLeft: Int
    private var corruptionsLeft: Int
    private(set) var polls: [Poll] = []
    private(set) var downloadOffsets: [UInt64] = []

    init(_ base: any DeviceTransport, cutDownloads: Int = 0, corruptDownloads: Int = 0) {
        self.base = base
        cutsLeft = cutDownloads
        corruptionsLeft = corruptDownloads
    }

    var recordedPolls: [Poll] { lock.withLock { polls } }
    var recordedOffsets: [UInt64] { lock.withLock { downloadOffsets } }

    func register(_ request: RegisterRequest, options: CallOptions) async throws
        -> RegisterResponse
    {
        try await base.register(request, options: options)
    }

    func getTask(_ request: GetTaskRequest, options: CallOptions) async throws -> GetTaskResponse {
        let start = ContinuousClock.now
        do {
            let answer = try await base.getTask(request, options: options)
            lock.withLock { polls.append(Poll(start: start, end: .now, answer: answer)) }
            return answer
        } catch {
            lock.withLock { polls.append(Poll(start: start, end: .now, answer: nil)) }
            throw error
        }
    }

    func downloadModel(_ request: DownloadModelRequest, options: CallOptions)
        -> AsyncThrowingStream<ModelChunk, any Error>
    {
        let (cut, corrupt) = lock.withLock { () -> (Bool, Bool) in
            downloadOffsets.append(request.offset)
            let cut = cutsLeft > 0
            let corrupt = !cut && corruptionsLeft > 0 && request.offset == 0
            if cut { cutsLeft -= 1 }
            if corrupt { corruptionsLeft -= 1 }
            return (cut, corrupt)
        }
        let base = self.base
        return AsyncThrowingStream { continuation in
            let pump = Task {
                do {
                    for try await chunk in base.downloadModel(request, options: options) {
                        var chunk = chunk
                        if corrupt && chunk.offset == 0 {
                            chunk.data[chunk.data.startIndex] ^= 0xFF
                        }
                        continuation.yield(chunk)
                        if cut {  // the connection drops after the first chunk
                            throw RefusedError(
                                .downloadModel, .unavailable, "test: the connection dropped")
                        }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in pump.cancel() }
        }
    }

    func submitUpdate<Chunks: AsyncSequence & Sendable>(_ chunks: Chunks, options: CallOptions)
        async throws -> SubmitUpdateResponse where Chunks.Element == UpdateChunk
    {
        try await base.submitUpdate(chunks, options: options)
    }

    func submitEvaluation(_ request: SubmitEvaluationRequest, options: CallOptions) async throws
        -> SubmitEvaluationResponse
    {
        try await base.submitEvaluation(request, options: options)
    }
}

/// An update stream that stops after `messages` messages and waits there until its task is
/// cancelled (then throws CancellationError): a submission cut mid-stream.
struct StalledMessages: AsyncSequence, Sendable {
    typealias Element = UpdateChunk
    let base: UpdateMessages
    let messages: Int
    let stalled: AsyncStream<Void>.Continuation

    struct AsyncIterator: AsyncIteratorProtocol {
        var base: UpdateMessages.AsyncIterator
        var left: Int
        let stalled: AsyncStream<Void>.Continuation

        mutating func next() async throws -> UpdateChunk? {
            if left == 0 {
                stalled.yield()
                try await Task.sleep(for: .seconds(120))
            }
            left -= 1
            return try await base.next()
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: base.makeAsyncIterator(), left: messages, stalled: stalled)
    }
}

/// Collects one agent's events.
final class Events: @unchecked Sendable {
    private let lock = NSLock()
    private var recorded: [AgentEvent] = []

    func record(_ event: AgentEvent) { lock.withLock { recorded.append(event) } }
    var all: [AgentEvent] { lock.withLock { recorded } }

    /// Task ids whose update the coordinator accepted, with the round it said.
    var accepted: [(taskId: String, round: UInt32)] {
        all.compactMap { if case .submitted(let t, let r) = $0 { (t, r) } else { nil } }
    }
}

/// Compares a round's model with the examples-weighted mean of the updates accepted for it.
/// Returns the number of values compared and the largest difference in float32 ulps.
func compareWithWeightedMean(
    model: [NamedTensor], updates: [TrainResult]
) throws -> (values: Int, maxUlps: Int) {
    let total = Double(updates.reduce(0) { $0 + $1.numExamples })
    var compared = 0
    var maxUlps = 0
    for tensor in model {
        var sum = [Double](repeating: 0, count: tensor.values.count)
        for update in updates {
            guard let sent = update.tensors.first(where: { $0.name == tensor.name }),
                sent.shape == tensor.shape
            else {
                throw CoordinatorError(
                    description: "no update tensor \(tensor.name) \(tensor.shape)")
            }
            let weight = Double(update.numExamples)
            for i in sent.values.indices { sum[i] += weight * Double(sent.values[i]) }
        }
        for i in sum.indices {
            let expected = Float(sum[i] / total)
            let got = tensor.values[i]
            if expected == got { continue }
            let ulps = abs(
                Int(Int32(bitPattern: expected.bitPattern))
                    - Int(Int32(bitPattern: got.bitPattern)))
            maxUlps = max(maxUlps, expected.sign == got.sign ? ulps : Int.max)
        }
        compared += sum.count
    }
    return (compared, maxUlps)
}
