// A one-shot reply slot: filled once from the reader thread, awaited once by the caller.
import Foundation

final class Reply: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<Data, any Error>?
    private var waiter: CheckedContinuation<Data, any Error>?

    /// Fills the slot; later calls are ignored (the first answer wins).
    func resolve(_ outcome: Result<Data, any Error>) {
        lock.lock()
        guard result == nil else {
            lock.unlock()
            return
        }
        result = outcome
        let waiting = waiter
        waiter = nil
        lock.unlock()
        waiting?.resume(with: outcome)
    }

    var isResolved: Bool {
        lock.lock()
        defer { lock.unlock() }
        return result != nil
    }

    func value() async throws -> Data {
        try await withCheckedThrowingContinuation { continuation in
            lock.lock()
            if let result {
                lock.unlock()
                continuation.resume(with: result)
            } else {
                waiter = continuation
                lock.unlock()
            }
        }
    }
}
