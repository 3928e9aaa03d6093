// A virtual clock, deterministic trainers and small helpers for the unit tests.
import FedCoreML
import Foundation

/// Virtual time: every sleep is recorded and returns at once, advancing the clock.
final class TestClock: AgentClock, @unchecked Sendable {
    private let lock = NSLock()
    private var current: Duration = .zero
    private var recorded: [Duration] = []

    func now() -> Duration {
        lock.lock()
        defer { lock.unlock() }
        return current
    }

    func sleep(for duration: Duration) async throws {
        try Task.checkCancellation()
        lock.withLock {
            recorded.append(duration)
            current += duration
        }
        await Task.yield()
        try Task.checkCancellation()
    }

    var sleeps: [Duration] {
        lock.lock()
        defer { lock.unlock() }
        return recorded
    }
}

/// Collects an agent's events.
final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var recorded: [AgentEvent] = []

    func record(_ event: AgentEvent) {
        lock.lock()
        recorded.append(event)
        lock.unlock()
    }

    var events: [AgentEvent] {
        lock.lock()
        defer { lock.unlock() }
        return recorded
    }

    var sleeps: [(Duration, SleepReason)] {
        events.compactMap { if case .slept(let d, let r) = $0 { (d, r) } else { nil } }
    }

    var dropped: [(taskId: String, reason: String, status: StatusCode?)] {
        events.compactMap {
            if case .taskDropped(let t, let r, let s) = $0 { (t, r, s) } else { nil }
        }
    }
}

/// Fixed tensors that depend on the task; records what it was given.
final class FixedTrainer: ModelTrainer, @unchecked Sendable {
    private let lock = NSLock()
    let tensors: [NamedTensor]
    var loss: Float = 0.5
    private(set) var trainedFiles: [(task: String, sha256: String, path: URL)] = []
    private(set) var evaluatedFiles: [(task: String, sha256: String)] = []

    init(tensors: [NamedTensor]) { self.tensors = tensors }

    func train(modelFile: URL, task: TrainTask) async throws -> TrainResult {
        let digest = SHA256Digest.hex(of: try Data(contentsOf: modelFile))
        lock.withLock { trainedFiles.append((task.taskId, digest, modelFile)) }
        return TrainResult(
            tensors: tensors, numExamples: 120, loss: loss, accuracy: 0.75,
            seconds: 0.25)
    }

    func evaluate(modelFile: URL, task: EvaluateTask) async throws -> EvaluationResult {
        let digest = SHA256Digest.hex(of: try Data(contentsOf: modelFile))
        lock.withLock { evaluatedFiles.append((task.taskId, digest)) }
        return EvaluationResult(numExamples: 30, loss: 0.7, accuracy: 0.6)
    }
}

/// Tensors shaped like a small convolutional model: conv [4,1,3,3] + bias, dense [10,36] + bias.
func sampleTensors(offset: Float = 0.25) throws -> [NamedTensor] {
    func values(_ count: Int, _ seed: Float) -> [Float] {
        (0..<count).map { Float($0 % 97) * 0.01 + seed + offset }
    }
    return [
        try NamedTensor(name: "conv1.weights", shape: [4, 1, 3, 3], values: values(36, 1)),
        try NamedTensor(name: "conv1.bias", shape: [4], values: values(4, 2)),
        try NamedTensor(name: "dense.weights", shape: [10, 36], values: values(360, 3)),
        try NamedTensor(name: "dense.bias", shape: [10], values: values(10, 4)),
    ]
}

/// Bytes standing in for an .mlmodel (the agent never parses it).
func sampleModel(size: Int = 200_000, seed: UInt8 = 7) -> Data {
    Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) })
}

func modelRef(_ model: Data, version: UInt64 = 0) -> ModelRef {
    ModelRef(version: version, sha256: SHA256Digest.hex(of: model), sizeBytes: UInt64(model.count))
}

func trainTask(_ id: String, _ model: Data, round: UInt32 = 1) -> GetTaskResponse {
    GetTaskResponse(
        .train(
            TrainTask(
                taskId: id, round: round, model: modelRef(model, version: UInt64(round - 1)),
                config: TrainConfig(epochs: 1, batchSize: 16, learningRate: 0.001),
                deadlineMs: 60_000)))
}

func evaluateTask(_ id: String, _ model: Data, round: UInt32 = 1) -> GetTaskResponse {
    GetTaskResponse(
        .evaluate(
            EvaluateTask(
                taskId: id, round: round, model: modelRef(model, version: UInt64(round)),
                deadlineMs: 60_000)))
}

func waitAnswer(_ millis: UInt32) -> GetTaskResponse {
    GetTaskResponse(.wait(Wait(retryAfterMs: millis, reason: "test")))
}

let fastRetry = try! RetryPolicy(
    initialBackoff: .milliseconds(500), maxBackoff: .seconds(30), giveUpAfter: .seconds(300),
    rpcTimeout: .seconds(20))

/// A fresh directory for the agent's model files.
func scratchDirectory() -> URL {
    FileManager.default.temporaryDirectory
        .appendingPathComponent("fedcoreml-tests-\(UUID().uuidString)", isDirectory: true)
}

func makeAgent(
    _ transport: FakeTransport, trainer: (any ModelTrainer)?, clock: any AgentClock,
    log: EventLog,
    deviceId: String = "swift-0", token: String? = nil,
    rule: EligibilityRule = .always,
    eligibility: any EligibilityProvider = FixedEligibility(),
    modelDirectory: URL = scratchDirectory()
) -> DeviceAgent {
    DeviceAgent(
        transport: transport, trainer: trainer,
        configuration: AgentConfiguration(
            deviceId: deviceId, platform: "iOS", osVersion: "18.0", appVersion: "1.0",
            token: token, retry: fastRetry, eligibilityRule: rule,
            modelDirectory: modelDirectory, jitterSeed: 42),
        eligibility: eligibility, clock: clock, onEvent: log.record)
}
