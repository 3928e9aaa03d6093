// Backoff for a coordinator that is unreachable or restarting (UNAVAILABLE, DEADLINE_EXCEEDED):
// exponential, with jitter, and a limit after which the device gives up. The same numbers as
// RetryPolicy in ios_bridge/device_client.py (protos/README.md: 0.5 s doubling to 30 s).
import Foundation

/// Backoff and deadlines. The n-th retry of one call waits `min(maxBackoff, initialBackoff *
/// 2^n)`, of which the upper half is random jitter; after `giveUpAfter` of failing the agent
/// throws ``GaveUpError``. Every call gets `rpcTimeout` (GetTask: more than the long poll).
public struct RetryPolicy: Sendable, Equatable {
    public var initialBackoff: Duration
    public var maxBackoff: Duration
    public var giveUpAfter: Duration
    public var rpcTimeout: Duration

    /// Throws ``ProtocolError`` naming the first duration that is not positive.
    public init(
        initialBackoff: Duration = .milliseconds(500), maxBackoff: Duration = .seconds(30),
        giveUpAfter: Duration = .seconds(300), rpcTimeout: Duration = .seconds(60)
    ) throws {
        for (name, value) in [
            ("initialBackoff", initialBackoff), ("maxBackoff", maxBackoff),
            ("giveUpAfter", giveUpAfter), ("rpcTimeout", rpcTimeout),
        ]
        where value <= .zero {
            throw ProtocolError("RetryPolicy.\(name) must be > 0, got \(value)")
        }
        self.initialBackoff = initialBackoff
        self.maxBackoff = maxBackoff
        self.giveUpAfter = giveUpAfter
        self.rpcTimeout = rpcTimeout
    }

    /// 0.5 s doubling to 30 s, give up after 5 minutes, 60 s per call.
    public static let standard = try! RetryPolicy()
}

/// One streak of retries of one call: its delays and its give-up clock.
struct Backoff {
    let policy: RetryPolicy
    private var attempt = 0
    private var firstFailure: Duration?

    init(policy: RetryPolicy) { self.policy = policy }

    mutating func reset() {
        attempt = 0
        firstFailure = nil
    }

    /// The delay before the next try, or ``GaveUpError`` once failing has lasted too long.
    mutating func nextDelay(
        now: Duration, what: String, refusal: RefusedError,
        random: inout SeededRandom
    ) throws -> Duration {
        if firstFailure == nil { firstFailure = now }
        let failingFor = now - firstFailure!
        let left = policy.giveUpAfter - failingFor
        guard left > .zero else {
            throw GaveUpError(
                "gave up after \(String(format: "%.1f", failingFor.seconds)) s: the coordinator "
                    + "did not answer \(what) (\(refusal.status.name): \(refusal.message)); "
                    + "is it running and reachable?",
                lastRefusal: refusal)
        }
        let doubled = policy.initialBackoff * (1 << min(attempt, 40))
        let ceiling = min(policy.maxBackoff, doubled)
        let jitter = ceiling / 2 * Double.random(in: 0...1, using: &random)
        attempt += 1
        return min(left, ceiling / 2 + jitter)
    }
}
