// The device side of the fedcoreml protocol, driven by a ModelTrainer: the Swift mirror of
// DeviceClient in ios_bridge/device_client.py, state for state and rule for rule.
//
// Recovery rules (protos/README.md), applied by run():
// - UNAVAILABLE / DEADLINE_EXCEEDED: the same call again, exponential backoff with jitter,
//   until RetryPolicy.giveUpAfter of failure (GaveUpError);
// - RESOURCE_EXHAUSTED with retry-after-ms: the same call again after exactly that long;
// - NOT_FOUND on GetTask (unknown session, e.g. a restarted coordinator): register again;
// - NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION on a task: drop it, ask for the next;
// - UNAUTHENTICATED: stop (the RefusedError is thrown), retrying cannot help;
// - anything else on a task (INVALID_ARGUMENT, ...): a bug on one side; the task is dropped.
import Foundation

/// One device taking part in a run. `run()` returns when the coordinator says the run is
/// finished; cancelling the task running it stops it at the next suspension point, and a
/// submission in flight is cancelled on the wire (never half-closed), so no task is left
/// half-submitted.
///
/// The low-level calls (`register`, `getTask`, `nextTask`, `downloadModel`, `submitUpdate`,
/// `submitEvaluation`) apply the retry rules but nothing else, for tools and tests that script
/// the protocol step by step; do not mix them with a `run()` in progress.
public actor DeviceAgent {
    /// GetTask's deadline exceeds the server's long poll by this much.
    static let longPollMargin: Duration = .seconds(5)
    /// NOT_FOUND on GetTask right after registering, this many times in a row: give up.
    static let maxSessionLosses = 5
    /// A model that fails verification is fetched once more from the start.
    static let downloadAttempts = 2
    /// Room left in a message for a tensor chunk's name, shape and framing.
    static let framingBytes = 64 * 1024

    public nonisolated let configuration: AgentConfiguration
    private let transport: any DeviceTransport
    private let trainer: (any ModelTrainer)?
    private let eligibility: any EligibilityProvider
    private let clock: any AgentClock
    private let onEvent: (@Sendable (AgentEvent) -> Void)?
    private var random: SeededRandom

    public private(set) var state: AgentState = .idle
    public private(set) var stats = AgentStats()
    public private(set) var sessionId = ""
    public private(set) var pacing = PacingHints()

    public init(
        transport: any DeviceTransport,
        trainer: (any ModelTrainer)?,
        configuration: AgentConfiguration,
        eligibility: any EligibilityProvider = FixedEligibility(),
        clock: any AgentClock = SystemClock(),
        onEvent: (@Sendable (AgentEvent) -> Void)? = nil
    ) {
        self.transport = transport
        self.trainer = trainer
        self.configuration = configuration
        self.eligibility = eligibility
        self.clock = clock
        self.onEvent = onEvent
        random =
            configuration.jitterSeed.map { SeededRandom(seed: $0) }
            ?? SeededRandom(seed: configuration.deviceId)
    }

    // MARK: the loop

    /// Register and work until the coordinator says the run is finished.
    ///
    /// Throws `CancellationError` when cancelled; ``GaveUpError``, the ``RefusedError`` of an
    /// UNAUTHENTICATED call or of a failed registration, or ``ProtocolError`` when the device
    /// cannot go on (also recorded in `stats.error`). Errors a trainer throws, other than
    /// ``TaskAbandonedError`` and ``TensorError``, propagate unchanged.
    @discardableResult
    public func run() async throws -> AgentStats {
        do {
            try await register()
            while try await !step() {}
            state = .done
            return stats
        } catch is CancellationError {
            state = .stopped
            throw CancellationError()
        } catch {
            state = .stopped
            stats.error = "\(error)"
            throw error
        }
    }

    /// One GetTask and what it asks for; true once the run is finished.
    private func step() async throws -> Bool {
        let capabilities = await eligibility.capabilities()
        if let reason = configuration.eligibilityRule.refusal(capabilities) {
            emit(.ineligible(reason: reason))
            try await sleep(pollDelay(), .ineligible)
            return false
        }
        let response = try await nextTask()
        switch response.task {
        case .finished(let finished):
            stats.finished = true
            emit(.finished(finished))
            return true
        case .train(let task):
            try await work(taskId: task.taskId, model: task.model) { file in
                try await self.train(task, modelFile: file)
            }
        case .evaluate(let task):
            try await work(taskId: task.taskId, model: task.model) { file in
                try await self.evaluate(task, modelFile: file)
            }
        case .wait(let wait):
            stats.waits += 1
            try await sleep(pollDelay(retryAfterMs: wait.retryAfterMs), .told)
        case nil:  // an empty answer from a newer server: ask again later
            stats.waits += 1
            try await sleep(pollDelay(), .told)
        }
        return false
    }

    /// Download, verify and hand the model to `body`; a task that fails is dropped, not fatal.
    private func work(
        taskId: String, model ref: ModelRef, _ body: (URL) async throws -> Void
    ) async throws {
        state = .downloading(taskId: taskId)
        do {
            let model = try await downloadModel(taskId: taskId, ref: ref)
            let file = try writeModelFile(model, taskId: taskId)
            defer { try? FileManager.default.removeItem(at: file) }
            state = .working(taskId: taskId)
            try await body(file)
        } catch let refusal as RefusedError where refusal.status != .unauthenticated {
            drop(taskId, "\(refusal)", refusal.status)
        } catch let error as ModelVerificationError {
            drop(taskId, error.message, nil)
        } catch let error as TaskAbandonedError {
            drop(taskId, error.reason, nil)
        } catch let error as TensorError {
            drop(taskId, "the trainer's tensors: \(error.message)", nil)
        }
    }

    private func train(_ task: TrainTask, modelFile: URL) async throws {
        guard let trainer else { throw TaskAbandonedError("this agent has no trainer") }
        let received = clock.now()
        try Task.checkCancellation()
        let result = try await trainer.train(modelFile: modelFile, task: task)
        try Task.checkCancellation()
        guard result.loss.isFinite, result.tensors.allSatisfy(\.isFinite) else {
            throw TaskAbandonedError("training diverged (loss \(result.loss)); not submitting")
        }
        warnIfLate(task.taskId, deadlineMs: task.deadlineMs, since: received)
        state = .submitting(taskId: task.taskId)
        let response = try await submitUpdate(taskId: task.taskId, result: result)
        stats.tasksTrained += 1
        stats.lastRound = response.round
        stats.lastTrainAccuracy = result.accuracy
        emit(.submitted(taskId: task.taskId, round: response.round))
    }

    private func evaluate(_ task: EvaluateTask, modelFile: URL) async throws {
        guard let trainer else { throw TaskAbandonedError("this agent has no trainer") }
        try Task.checkCancellation()
        let result = try await trainer.evaluate(modelFile: modelFile, task: task)
        try Task.checkCancellation()
        state = .submitting(taskId: task.taskId)
        try await submitEvaluation(taskId: task.taskId, result: result)
        stats.tasksEvaluated += 1
        stats.lastRound = task.round
        stats.lastAccuracy = result.accuracy
        emit(.evaluated(taskId: task.taskId))
    }

    private func drop(_ taskId: String, _ reason: String, _ status: StatusCode?) {
        stats.failures += 1
        emit(.taskDropped(taskId: taskId, reason: reason, status: status))
    }

    private func warnIfLate(_ taskId: String, deadlineMs: UInt32, since received: Duration) {
        let seconds = (clock.now() - received).seconds
        if deadlineMs > 0, seconds > Double(deadlineMs) / 1000 {
            emit(.late(taskId: taskId, seconds: seconds))
        }
    }

    /// The model as a file for the trainer, written atomically.
    private func writeModelFile(_ data: Data, taskId: String) throws -> URL {
        let directory = configuration.modelDirectory
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let safe = String(
            taskId.unicodeScalars.map {
                CharacterSet.alphanumerics.contains($0) ? Character($0) : "_"
            }.prefix(64))
        let file = directory.appendingPathComponent("\(configuration.deviceId)-\(safe).mlmodel")
        try data.write(to: file, options: .atomic)
        return file
    }

    // MARK: low-level calls

    /// Register (again); keeps the session id and the pacing hints.
    @discardableResult
    public func register() async throws -> RegisterResponse {
        state = .registering
        let request = RegisterRequest(
            deviceId: configuration.deviceId, platform: configuration.platform,
            osVersion: configuration.osVersion, appVersion: configuration.appVersion,
            capabilities: await eligibility.capabilities())
        let response = try await call(.register) { transport, options in
            try await transport.register(request, options: options)
        }
        sessionId = response.sessionId
        pacing = response.pacing
        stats.registrations += 1
        emit(.registered(sessionId: response.sessionId, pacing: response.pacing))
        return response
    }

    /// One GetTask answer; the call's deadline exceeds the server's long poll.
    public func getTask() async throws -> GetTaskResponse {
        state = .polling
        let request = GetTaskRequest(
            sessionId: sessionId, capabilities: await eligibility.capabilities())
        let timeout = max(
            configuration.retry.rpcTimeout, .ms(pacing.longPollMs) + Self.longPollMargin)
        let response = try await call(.getTask, timeout: timeout) { transport, options in
            try await transport.getTask(request, options: options)
        }
        stats.polls += 1
        emit(.answered(response))
        return response
    }

    /// The next GetTask answer, registering again whenever the session is unknown.
    public func nextTask() async throws -> GetTaskResponse {
        var losses = 0
        while true {
            do {
                return try await getTask()
            } catch let refusal as RefusedError where refusal.status == .notFound {
                losses += 1
                if losses > Self.maxSessionLosses {
                    throw ProtocolError(
                        "the coordinator forgot the session \(losses) times in a row right "
                            + "after registering (\(refusal.message))")
                }
                if losses > 1 { try await sleep(pollDelay(), .sessionLost) }
                try await register()
            }
        }
    }

    /// The task's whole `.mlmodel`, resuming after dropped streams, checked against `ref`.
    ///
    /// Bytes that fail the size or sha256 check are thrown away and fetched once more from the
    /// start; ``ModelVerificationError`` if they fail again.
    public func downloadModel(taskId: String, ref: ModelRef) async throws -> Data {
        for attempt in 1...Self.downloadAttempts {
            let (data, digest) = try await downloadOnce(taskId: taskId, ref: ref)
            do {
                try verify(data, digest: digest, ref: ref)
                emit(.modelVerified(taskId: taskId, bytes: data.count))
                return data
            } catch let error as ModelVerificationError {
                emit(.modelRejected(taskId: taskId, reason: error.message))
                if attempt == Self.downloadAttempts { throw error }
            }
        }
        throw ProtocolError("unreachable: no download attempt")
    }

    /// The bytes as the coordinator sends them, resuming after dropped streams, and their
    /// sha256 (hex). A chunk that does not fit `ref` ends the attempt (ModelVerificationError).
    private func downloadOnce(taskId: String, ref: ModelRef) async throws -> (Data, String) {
        var data = Data()
        var digest = SHA256Digest()
        var backoff = Backoff(policy: configuration.retry)
        while true {
            try Task.checkCancellation()
            let request = DownloadModelRequest(
                sessionId: sessionId, taskId: taskId, offset: UInt64(data.count))
            emit(.downloadStarted(taskId: taskId, offset: request.offset))
            do {
                for try await chunk in transport.downloadModel(request, options: options()) {
                    try Self.check(chunk, at: data.count, ref: ref)
                    data.append(chunk.data)
                    digest.update(chunk.data)
                    backoff.reset()
                    try Task.checkCancellation()
                }
                return (data, digest.hexDigest())
            } catch let refusal as RefusedError {
                let what = "DownloadModel of task \(taskId) (resuming at byte \(data.count))"
                try await retryOrThrow(what, refusal, &backoff)
            }
        }
    }

    private static func check(_ chunk: ModelChunk, at received: Int, ref: ModelRef) throws {
        guard chunk.offset == UInt64(received) else {
            throw ModelVerificationError(
                "model chunk at byte \(chunk.offset), expected \(received)")
        }
        guard chunk.totalSize == ref.sizeBytes else {
            throw ModelVerificationError(
                "the download is \(chunk.totalSize) bytes but the task announced \(ref.sizeBytes)")
        }
        guard UInt64(received) + UInt64(chunk.data.count) <= ref.sizeBytes else {
            throw ModelVerificationError(
                "the download runs past the announced \(ref.sizeBytes) bytes")
        }
    }

    private func verify(_ data: Data, digest: String, ref: ModelRef) throws {
        guard UInt64(data.count) == ref.sizeBytes else {
            throw ModelVerificationError(
                "downloaded \(data.count) bytes but the task announced \(ref.sizeBytes)")
        }
        guard digest == ref.sha256.lowercased() else {
            throw ModelVerificationError(
                "sha256 mismatch: the model hashes to \(digest) but the task announced "
                    + "\(ref.sha256.isEmpty ? "(none)" : ref.sha256); not using it")
        }
    }

    /// Stream `result`'s tensors (header first) in chunks within the server's limits.
    public func submitUpdate(
        taskId: String, result: TrainResult, chunkBytes: Int? = nil
    ) async throws -> SubmitUpdateResponse {
        let header = UpdateHeader(
            sessionId: sessionId, taskId: taskId, numExamples: UInt64(max(result.numExamples, 0)),
            loss: result.loss, accuracy: result.accuracy, trainSeconds: result.seconds,
            numTensors: 0)
        let messages = try UpdateMessages(
            header: header, tensors: result.tensors, chunkBytes: chunkBytes ?? self.chunkBytes())
        return try await submitUpdateStream { messages }
    }

    /// A SubmitUpdate of the messages `makeMessages()` yields (called again for a retry).
    public func submitUpdateStream<Messages: AsyncSequence & Sendable>(
        _ makeMessages: @Sendable () -> Messages
    ) async throws -> SubmitUpdateResponse where Messages.Element == UpdateChunk {
        let response = try await call(.submitUpdate) { transport, options in
            try await transport.submitUpdate(makeMessages(), options: options)
        }
        guard response.accepted else {
            throw ProtocolError("the coordinator answered SubmitUpdate without accepting it")
        }
        return response
    }

    @discardableResult
    public func submitEvaluation(taskId: String, result: EvaluationResult) async throws
        -> SubmitEvaluationResponse
    {
        let request = SubmitEvaluationRequest(
            sessionId: sessionId, taskId: taskId, numExamples: UInt64(max(result.numExamples, 0)),
            loss: result.loss, accuracy: result.accuracy)
        let response = try await call(.submitEvaluation) { transport, options in
            try await transport.submitEvaluation(request, options: options)
        }
        guard response.accepted else {
            throw ProtocolError("the coordinator answered SubmitEvaluation without accepting it")
        }
        return response
    }

    // MARK: pacing, retries

    /// Tensor slice size: the coordinator's preference, never over its message limit.
    public func chunkBytes() -> Int {
        let limit =
            (pacing.maxMessageBytes == 0 ? maxMessageBytes : Int(pacing.maxMessageBytes))
            - Self.framingBytes
        let preferred = pacing.chunkBytes == 0 ? defaultChunkBytes : Int(pacing.chunkBytes)
        return max(4, min(preferred, limit) / 4 * 4)
    }

    /// How long to wait before asking again: the server's hint, else its poll interval, else 1 s.
    public func pollDelay(retryAfterMs: UInt32 = 0) -> Duration {
        let millis = retryAfterMs != 0 ? retryAfterMs : pacing.pollIntervalMs
        return millis != 0 ? .ms(millis) : .seconds(1)
    }

    private func options(timeout: Duration? = nil) -> CallOptions {
        CallOptions(
            timeout: timeout ?? configuration.retry.rpcTimeout,
            metadata: configuration.token.map(bearerMetadata) ?? [])
    }

    /// `body`, retried while it fails with a transient status or a rate limit.
    private func call<Response: Sendable>(
        _ rpc: RPC, timeout: Duration? = nil,
        _ body: (any DeviceTransport, CallOptions) async throws -> Response
    ) async throws -> Response {
        var backoff = Backoff(policy: configuration.retry)
        while true {
            try Task.checkCancellation()
            do {
                return try await body(transport, options(timeout: timeout))
            } catch let refusal as RefusedError {
                try await retryOrThrow(rpc.rawValue, refusal, &backoff)
            }
        }
    }

    /// After a failed call: sleep before retrying it, or throw `refusal`.
    private func retryOrThrow(
        _ what: String, _ refusal: RefusedError, _ backoff: inout Backoff
    ) async throws {
        stats.refusals[refusal.status.name, default: 0] += 1
        emit(.callFailed(refusal))
        if let retryAfter = refusal.retryAfter, refusal.isThrottled {
            stats.throttled += 1
            try await sleep(min(retryAfter, configuration.retry.giveUpAfter), .throttled)
            return
        }
        guard refusal.isTransient else { throw refusal }
        stats.retries += 1
        let delay = try backoff.nextDelay(
            now: clock.now(), what: what, refusal: refusal, random: &random)
        try await sleep(delay, .backoff)
    }

    private func sleep(_ duration: Duration, _ reason: SleepReason) async throws {
        let previous = state
        state = .waiting
        emit(.slept(duration, reason))
        try await clock.sleep(for: duration)
        state = previous
    }

    private func emit(_ event: AgentEvent) { onEvent?(event) }
}
