// Time and chance for the agent, injectable so that tests run its waits and backoffs instantly
// and reproducibly.
import Foundation

/// Monotonic time and sleeping. `sleep` must throw `CancellationError` when the sleeping task
/// is cancelled (as `Task.sleep` does), so a cancelled agent stops at once.
public protocol AgentClock: Sendable {
    /// Time since an arbitrary fixed origin; only differences matter.
    func now() -> Duration
    func sleep(for duration: Duration) async throws
}

/// Real time: `ContinuousClock` (it keeps counting while the phone sleeps).
public struct SystemClock: AgentClock {
    private let origin = ContinuousClock.now

    public init() {}

    public func now() -> Duration { ContinuousClock.now - origin }

    public func sleep(for duration: Duration) async throws {
        if duration > .zero {
            try await Task.sleep(for: duration)
        } else {
            try Task.checkCancellation()
        }
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a small seeded generator for backoff jitter, so a
/// fleet started with different seeds spreads its retries and a test can replay them.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    /// A seed from a string (a device id), the same on every platform and run.
    public init(seed: String) {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a
        for byte in seed.utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
        }
        state = hash
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    public var seconds: Double {
        let (whole, attoseconds) = components
        return Double(whole) + Double(attoseconds) / 1e18
    }

    /// `milliseconds` ms.
    public static func ms<T: BinaryInteger>(_ milliseconds: T) -> Duration {
        .milliseconds(Int64(milliseconds))
    }
}
