// The messages of protos/fedcoreml/v1/device.proto as Swift values, Codable in the proto3
// JSON mapping (ProtoJSON.swift). Field for field the same as the proto; see protos/README.md
// for what each field means. Transports convert them to and from their own wire types.
import Foundation

public struct DeviceCapabilities: ProtoMessage {
    public var charging = false
    public var unmeteredNetwork = false
    /// 0...1; negative when unknown.
    public var batteryLevel: Float = 0

    public init() {}
    public init(charging: Bool, unmeteredNetwork: Bool, batteryLevel: Float) {
        self.charging = charging
        self.unmeteredNetwork = unmeteredNetwork
        self.batteryLevel = batteryLevel
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        charging = try c.field("charging")
        unmeteredNetwork = try c.field("unmeteredNetwork", "unmetered_network")
        batteryLevel = try c.field("batteryLevel", "battery_level")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(charging, "charging")
        try c.field(unmeteredNetwork, "unmeteredNetwork")
        try c.field(batteryLevel, "batteryLevel")
    }
}

public struct RegisterRequest: ProtoMessage {
    public var deviceId = ""
    public var platform = ""
    public var osVersion = ""
    public var appVersion = ""
    public var capabilities = DeviceCapabilities()

    public init() {}
    public init(
        deviceId: String, platform: String, osVersion: String = "", appVersion: String = "",
        capabilities: DeviceCapabilities = DeviceCapabilities()
    ) {
        self.deviceId = deviceId
        self.platform = platform
        self.osVersion = osVersion
        self.appVersion = appVersion
        self.capabilities = capabilities
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        deviceId = try c.field("deviceId", "device_id")
        platform = try c.field("platform")
        osVersion = try c.field("osVersion", "os_version")
        appVersion = try c.field("appVersion", "app_version")
        capabilities = try c.field("capabilities")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(deviceId, "deviceId")
        try c.field(platform, "platform")
        try c.field(osVersion, "osVersion")
        try c.field(appVersion, "appVersion")
        try c.field(capabilities, "capabilities")
    }
}

public struct PacingHints: ProtoMessage {
    /// How long to wait between GetTask calls when told to wait.
    public var pollIntervalMs: UInt32 = 0
    /// The server's receive limit for one message.
    public var maxMessageBytes: UInt32 = 0
    /// Preferred payload size of one upload chunk.
    public var chunkBytes: UInt32 = 0
    /// A session silent for longer than this is dropped.
    public var sessionTtlMs: UInt32 = 0
    /// GetTask may wait this long for a task before answering.
    public var longPollMs: UInt32 = 0

    public init() {}
    public init(
        pollIntervalMs: UInt32 = 0, maxMessageBytes: UInt32 = 0, chunkBytes: UInt32 = 0,
        sessionTtlMs: UInt32 = 0, longPollMs: UInt32 = 0
    ) {
        self.pollIntervalMs = pollIntervalMs
        self.maxMessageBytes = maxMessageBytes
        self.chunkBytes = chunkBytes
        self.sessionTtlMs = sessionTtlMs
        self.longPollMs = longPollMs
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        pollIntervalMs = try c.field("pollIntervalMs", "poll_interval_ms")
        maxMessageBytes = try c.field("maxMessageBytes", "max_message_bytes")
        chunkBytes = try c.field("chunkBytes", "chunk_bytes")
        sessionTtlMs = try c.field("sessionTtlMs", "session_ttl_ms")
        longPollMs = try c.field("longPollMs", "long_poll_ms")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(pollIntervalMs, "pollIntervalMs")
        try c.field(maxMessageBytes, "maxMessageBytes")
        try c.field(chunkBytes, "chunkBytes")
        try c.field(sessionTtlMs, "sessionTtlMs")
        try c.field(longPollMs, "longPollMs")
    }
}

public struct RegisterResponse: ProtoMessage {
    public var sessionId = ""
    public var pacing = PacingHints()

    public init() {}
    public init(sessionId: String, pacing: PacingHints) {
        self.sessionId = sessionId
        self.pacing = pacing
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        sessionId = try c.field("sessionId", "session_id")
        pacing = try c.field("pacing")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(sessionId, "sessionId")
        try c.field(pacing, "pacing")
    }
}

public struct GetTaskRequest: ProtoMessage {
    public var sessionId = ""
    public var capabilities = DeviceCapabilities()

    public init() {}
    public init(sessionId: String, capabilities: DeviceCapabilities) {
        self.sessionId = sessionId
        self.capabilities = capabilities
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        sessionId = try c.field("sessionId", "session_id")
        capabilities = try c.field("capabilities")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(sessionId, "sessionId")
        try c.field(capabilities, "capabilities")
    }
}

public struct ModelRef: ProtoMessage {
    /// The global model version (its round number).
    public var version: UInt64 = 0
    /// Hex digest of the .mlmodel bytes.
    public var sha256 = ""
    public var sizeBytes: UInt64 = 0

    public init() {}
    public init(version: UInt64, sha256: String, sizeBytes: UInt64) {
        self.version = version
        self.sha256 = sha256
        self.sizeBytes = sizeBytes
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        version = try c.field("version")
        sha256 = try c.field("sha256")
        sizeBytes = try c.field("sizeBytes", "size_bytes")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(version, "version")
        try c.field(sha256, "sha256")
        try c.field(sizeBytes, "sizeBytes")
    }
}

/// Per-task overrides of `MLModelConfiguration.parameters`; zero means the model's default.
public struct TrainConfig: ProtoMessage {
    public var epochs: UInt32 = 0
    public var batchSize: UInt32 = 0
    public var learningRate: Double = 0

    public init() {}
    public init(epochs: UInt32, batchSize: UInt32, learningRate: Double) {
        self.epochs = epochs
        self.batchSize = batchSize
        self.learningRate = learningRate
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        epochs = try c.field("epochs")
        batchSize = try c.field("batchSize", "batch_size")
        learningRate = try c.field("learningRate", "learning_rate")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(epochs, "epochs")
        try c.field(batchSize, "batchSize")
        try c.field(learningRate, "learningRate")
    }
}

public struct TrainTask: ProtoMessage {
    public var taskId = ""
    public var round: UInt32 = 0
    public var model = ModelRef()
    public var config = TrainConfig()
    /// Submit within this time from now, or the round may close without you.
    public var deadlineMs: UInt32 = 0

    public init() {}
    public init(
        taskId: String, round: UInt32, model: ModelRef, config: TrainConfig = TrainConfig(),
        deadlineMs: UInt32 = 0
    ) {
        self.taskId = taskId
        self.round = round
        self.model = model
        self.config = config
        self.deadlineMs = deadlineMs
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        taskId = try c.field("taskId", "task_id")
        round = try c.field("round")
        model = try c.field("model")
        config = try c.field("config")
        deadlineMs = try c.field("deadlineMs", "deadline_ms")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(taskId, "taskId")
        try c.field(round, "round")
        try c.field(model, "model")
        try c.field(config, "config")
        try c.field(deadlineMs, "deadlineMs")
    }
}

public struct EvaluateTask: ProtoMessage {
    public var taskId = ""
    public var round: UInt32 = 0
    public var model = ModelRef()
    public var deadlineMs: UInt32 = 0

    public init() {}
    public init(taskId: String, round: UInt32, model: ModelRef, deadlineMs: UInt32 = 0) {
        self.taskId = taskId
        self.round = round
        self.model = model
        self.deadlineMs = deadlineMs
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        taskId = try c.field("taskId", "task_id")
        round = try c.field("round")
        model = try c.field("model")
        deadlineMs = try c.field("deadlineMs", "deadline_ms")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(taskId, "taskId")
        try c.field(round, "round")
        try c.field(model, "model")
        try c.field(deadlineMs, "deadlineMs")
    }
}

public struct Wait: ProtoMessage {
    public var retryAfterMs: UInt32 = 0
    public var reason = ""

    public init() {}
    public init(retryAfterMs: UInt32, reason: String = "") {
        self.retryAfterMs = retryAfterMs
        self.reason = reason
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        retryAfterMs = try c.field("retryAfterMs", "retry_after_ms")
        reason = try c.field("reason")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(retryAfterMs, "retryAfterMs")
        try c.field(reason, "reason")
    }
}

public struct RunFinished: ProtoMessage {
    public var reason = ""
    public var finalModel = ModelRef()

    public init() {}
    public init(reason: String, finalModel: ModelRef = ModelRef()) {
        self.reason = reason
        self.finalModel = finalModel
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        reason = try c.field("reason")
        finalModel = try c.field("finalModel", "final_model")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(reason, "reason")
        try c.field(finalModel, "finalModel")
    }
}

public struct GetTaskResponse: ProtoMessage {
    /// The oneof `task`: exactly one of these, or nil from a server that sent none.
    public enum Task: Sendable, Equatable {
        case train(TrainTask)
        case evaluate(EvaluateTask)
        case wait(Wait)
        case finished(RunFinished)
    }

    public var task: Task?

    public init() {}
    public init(_ task: Task) { self.task = task }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        var found: [Task] = []
        if try c.has("train") { found.append(.train(try c.field("train"))) }
        if try c.has("evaluate") { found.append(.evaluate(try c.field("evaluate"))) }
        if try c.has("wait") { found.append(.wait(try c.field("wait"))) }
        if try c.has("finished") { found.append(.finished(try c.field("finished"))) }
        guard found.count <= 1 else {
            throw protoJSONError(decoder, "GetTaskResponse: more than one member of oneof task")
        }
        task = found.first
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        switch task {
        case .train(let value): try c.member(value, "train")
        case .evaluate(let value): try c.member(value, "evaluate")
        case .wait(let value): try c.member(value, "wait")
        case .finished(let value): try c.member(value, "finished")
        case nil: break
        }
    }
}

public struct DownloadModelRequest: ProtoMessage {
    public var sessionId = ""
    public var taskId = ""
    /// Resume from this byte.
    public var offset: UInt64 = 0

    public init() {}
    public init(sessionId: String, taskId: String, offset: UInt64 = 0) {
        self.sessionId = sessionId
        self.taskId = taskId
        self.offset = offset
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        sessionId = try c.field("sessionId", "session_id")
        taskId = try c.field("taskId", "task_id")
        offset = try c.field("offset")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(sessionId, "sessionId")
        try c.field(taskId, "taskId")
        try c.field(offset, "offset")
    }
}

public struct ModelChunk: ProtoMessage {
    /// Where `data` starts in the .mlmodel.
    public var offset: UInt64 = 0
    public var data = Data()
    /// Size of the whole .mlmodel.
    public var totalSize: UInt64 = 0
    /// Of the whole .mlmodel; verify after the last chunk.
    public var sha256 = ""

    public init() {}
    public init(offset: UInt64, data: Data, totalSize: UInt64, sha256: String) {
        self.offset = offset
        self.data = data
        self.totalSize = totalSize
        self.sha256 = sha256
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        offset = try c.field("offset")
        data = try c.field("data")
        totalSize = try c.field("totalSize", "total_size")
        sha256 = try c.field("sha256")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(offset, "offset")
        try c.field(data, "data")
        try c.field(totalSize, "totalSize")
        try c.field(sha256, "sha256")
    }
}

public struct UpdateHeader: ProtoMessage {
    public var sessionId = ""
    public var taskId = ""
    public var numExamples: UInt64 = 0
    public var loss: Float = 0
    public var accuracy: Float = 0
    public var trainSeconds: Float = 0
    /// How many distinct tensors follow.
    public var numTensors: UInt32 = 0

    public init() {}
    public init(
        sessionId: String, taskId: String, numExamples: UInt64, loss: Float, accuracy: Float,
        trainSeconds: Float, numTensors: UInt32
    ) {
        self.sessionId = sessionId
        self.taskId = taskId
        self.numExamples = numExamples
        self.loss = loss
        self.accuracy = accuracy
        self.trainSeconds = trainSeconds
        self.numTensors = numTensors
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        sessionId = try c.field("sessionId", "session_id")
        taskId = try c.field("taskId", "task_id")
        numExamples = try c.field("numExamples", "num_examples")
        loss = try c.field("loss")
        accuracy = try c.field("accuracy")
        trainSeconds = try c.field("trainSeconds", "train_seconds")
        numTensors = try c.field("numTensors", "num_tensors")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(sessionId, "sessionId")
        try c.field(taskId, "taskId")
        try c.field(numExamples, "numExamples")
        try c.field(loss, "loss")
        try c.field(accuracy, "accuracy")
        try c.field(trainSeconds, "trainSeconds")
        try c.field(numTensors, "numTensors")
    }
}

/// A slice of one tensor: float32 little-endian bytes of `name`, from byte `offset` of it.
public struct TensorChunk: ProtoMessage {
    /// "<layer>.weights" or "<layer>.bias".
    public var name = ""
    /// Core ML layout.
    public var shape: [UInt32] = []
    public var offset: UInt64 = 0
    public var data = Data()

    public init() {}
    public init(name: String, shape: [UInt32], offset: UInt64, data: Data) {
        self.name = name
        self.shape = shape
        self.offset = offset
        self.data = data
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        name = try c.field("name")
        shape = try c.field("shape")
        offset = try c.field("offset")
        data = try c.field("data")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(name, "name")
        try c.field(shape, "shape")
        try c.field(offset, "offset")
        try c.field(data, "data")
    }
}

public struct UpdateChunk: ProtoMessage {
    /// The oneof `part`: the header (first message, exactly once) or a tensor slice.
    public enum Part: Sendable, Equatable {
        case header(UpdateHeader)
        case tensor(TensorChunk)
    }

    public var part: Part?

    public init() {}
    public init(_ part: Part) { self.part = part }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        let hasHeader = try c.has("header")
        let hasTensor = try c.has("tensor")
        guard !(hasHeader && hasTensor) else {
            throw protoJSONError(decoder, "UpdateChunk: both header and tensor of oneof part")
        }
        if hasHeader { part = .header(try c.field("header")) }
        if hasTensor { part = .tensor(try c.field("tensor")) }
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        switch part {
        case .header(let value): try c.member(value, "header")
        case .tensor(let value): try c.member(value, "tensor")
        case nil: break
        }
    }
}

public struct SubmitUpdateResponse: ProtoMessage {
    public var accepted = false
    public var round: UInt32 = 0

    public init() {}
    public init(accepted: Bool, round: UInt32) {
        self.accepted = accepted
        self.round = round
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        accepted = try c.field("accepted")
        round = try c.field("round")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(accepted, "accepted")
        try c.field(round, "round")
    }
}

public struct SubmitEvaluationRequest: ProtoMessage {
    public var sessionId = ""
    public var taskId = ""
    public var numExamples: UInt64 = 0
    public var loss: Float = 0
    public var accuracy: Float = 0

    public init() {}
    public init(
        sessionId: String, taskId: String, numExamples: UInt64, loss: Float, accuracy: Float
    ) {
        self.sessionId = sessionId
        self.taskId = taskId
        self.numExamples = numExamples
        self.loss = loss
        self.accuracy = accuracy
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        sessionId = try c.field("sessionId", "session_id")
        taskId = try c.field("taskId", "task_id")
        numExamples = try c.field("numExamples", "num_examples")
        loss = try c.field("loss")
        accuracy = try c.field("accuracy")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(sessionId, "sessionId")
        try c.field(taskId, "taskId")
        try c.field(numExamples, "numExamples")
        try c.field(loss, "loss")
        try c.field(accuracy, "accuracy")
    }
}

public struct SubmitEvaluationResponse: ProtoMessage {
    public var accepted = false

    public init() {}
    public init(accepted: Bool) { self.accepted = accepted }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ProtoKey.self)
        accepted = try c.field("accepted")
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: ProtoKey.self)
        try c.field(accepted, "accepted")
    }
}
