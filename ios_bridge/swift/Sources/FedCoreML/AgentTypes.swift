// What a DeviceAgent is configured with, where it is, what it tells the app, and what it did.
import Foundation

/// Who the device is and how it behaves; the app chooses these once per installation.
public struct AgentConfiguration: Sendable {
    /// Stable per installation (see ``deviceIdRule``); the coordinator refuses other ids.
    public var deviceId: String
    public var platform: String
    public var osVersion: String
    public var appVersion: String
    /// Sent as `authorization: Bearer <token>` on every call when set.
    public var token: String?
    public var retry: RetryPolicy
    /// Ask for work only while this holds (the capabilities are reported either way).
    public var eligibilityRule: EligibilityRule
    /// Where downloaded models are written for the trainer (one file per task, deleted after).
    public var modelDirectory: URL
    /// Seeds the backoff jitter; by default derived from the device id.
    public var jitterSeed: UInt64?

    public init(
        deviceId: String, platform: String = "iOS", osVersion: String = "",
        appVersion: String = "", token: String? = nil, retry: RetryPolicy = .standard,
        eligibilityRule: EligibilityRule = .always,
        modelDirectory: URL = FileManager.default.temporaryDirectory
            .appendingPathComponent("fedcoreml-models", isDirectory: true),
        jitterSeed: UInt64? = nil
    ) {
        self.deviceId = deviceId
        self.platform = platform
        self.osVersion = osVersion
        self.appVersion = appVersion
        self.token = token
        self.retry = retry
        self.eligibilityRule = eligibilityRule
        self.modelDirectory = modelDirectory
        self.jitterSeed = jitterSeed
    }
}

/// The agent's place in the protocol (the states of ios_bridge/device_client.py):
/// REGISTER -> POLL -> (wait) POLL | (train/evaluate) DOWNLOAD -> WORK -> SUBMIT -> POLL
/// | (finished) DONE.
public enum AgentState: Sendable, Equatable {
    case idle
    case registering
    case polling
    /// Sleeping before the next call: told to wait, throttled, backing off or not eligible.
    case waiting
    case downloading(taskId: String)
    case working(taskId: String)
    case submitting(taskId: String)
    /// The coordinator said the run is finished.
    case done
    /// Cancelled, or stopped by an error ``DeviceAgent/run()`` threw.
    case stopped
}

/// Why the agent slept.
public enum SleepReason: Sendable, Equatable {
    /// A `Wait` answer (its `retry_after_ms`, else the pacing hints' poll interval).
    case told
    /// `RESOURCE_EXHAUSTED` with `retry-after-ms`: exactly as long as asked.
    case throttled
    /// `UNAVAILABLE` / `DEADLINE_EXCEEDED`: exponential backoff with jitter.
    case backoff
    /// The eligibility rule did not hold.
    case ineligible
    /// The coordinator forgot the session again right after registering.
    case sessionLost
}

/// What happened, as it happens: for the app's log and UI, and for tests.
public enum AgentEvent: Sendable, Equatable {
    case registered(sessionId: String, pacing: PacingHints)
    /// Every GetTask answer.
    case answered(GetTaskResponse)
    case ineligible(reason: String)
    case slept(Duration, SleepReason)
    /// Every DownloadModel call; an offset above zero resumes a cut download.
    case downloadStarted(taskId: String, offset: UInt64)
    /// Downloaded bytes that failed the size or sha256 check, thrown away.
    case modelRejected(taskId: String, reason: String)
    case modelVerified(taskId: String, bytes: Int)
    /// A call that failed (and was retried, or its error handled or thrown).
    case callFailed(RefusedError)
    case submitted(taskId: String, round: UInt32)
    case evaluated(taskId: String)
    /// Submitting later than the task's deadline: the coordinator may refuse it.
    case late(taskId: String, seconds: Double)
    /// A task given up: its reason, and the refusal's status if the coordinator refused.
    case taskDropped(taskId: String, reason: String, status: StatusCode?)
    case finished(RunFinished)
}

/// What one device did: tasks, failures, retries and its last results.
public struct AgentStats: Sendable, Equatable {
    public var registrations = 0
    /// GetTask answers received.
    public var polls = 0
    public var waits = 0
    /// Updates the coordinator accepted.
    public var tasksTrained = 0
    /// Evaluations the coordinator accepted.
    public var tasksEvaluated = 0
    /// Tasks dropped: refused, bad model, abandoned.
    public var failures = 0
    /// Calls retried after UNAVAILABLE / DEADLINE_EXCEEDED.
    public var retries = 0
    /// Calls retried after RESOURCE_EXHAUSTED with a retry-after.
    public var throttled = 0
    public var lastRound: UInt32?
    public var lastTrainAccuracy: Float?
    /// On the held-out split, from the last evaluate task.
    public var lastAccuracy: Float?
    public var finished = false
    public var error: String?
    /// Status name -> how many calls ended with it.
    public var refusals: [String: Int] = [:]

    public init() {}
}
