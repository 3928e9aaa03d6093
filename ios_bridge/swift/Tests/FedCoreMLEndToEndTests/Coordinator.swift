// A real `fedcoreml server` as a child process on 127.0.0.1 (port 0), for the end-to-end tests.
import FedCoreML
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The Python interpreter with fedcoreml installed: $FEDCOREML_PYTHON, else python3.
let pythonInterpreter = ProcessInfo.processInfo.environment["FEDCOREML_PYTHON"] ?? "python3"

/// Whether `python3 -c "import fedcoreml"` works here (the end-to-end tests need it).
let fedcoremlInstalled: Bool = {
    let probe = Process()
    probe.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    probe.arguments = [pythonInterpreter, "-c", "import fedcoreml"]
    probe.standardOutput = FileHandle.nullDevice
    probe.standardError = FileHandle.nullDevice
    do {
        try probe.run()
    } catch {
        return false
    }
    probe.waitUntilExit()
    return probe.terminationStatus == 0
}()

struct CoordinatorError: Error, CustomStringConvertible {
    let description: String
}

/// Runs `python -m fedcoreml.server.cli ARGS` to completion, for setup steps.
@discardableResult
func runFedcoreml(_ arguments: [String]) throws -> String {
    try runPython(module: "fedcoreml.server.cli", arguments)
}

/// Runs `python -m MODULE ARGS` to completion; its output (stdout and stderr).
func runPython(module: String, _ arguments: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [pythonInterpreter, "-m", module] + arguments
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw CoordinatorError(
            description: "python -m \(module) \(arguments.joined(separator: " ")) failed:\n\(text)")
    }
    return text
}

/// `fedcoreml server --insecure --listen 127.0.0.1:0 --run-dir DIR ...`, its log collected.
final class Coordinator: @unchecked Sendable {
    let runDirectory: URL
    let process = Process()
    private let lock = NSLock()
    private var logText = ""
    private(set) var port = 0

    /// Starts the coordinator and waits until it says which port it listens on.
    init(runDirectory: URL, arguments: [String]) throws {
        self.runDirectory = runDirectory
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments =
            [
                pythonInterpreter, "-m", "fedcoreml.server.cli", "server", "--listen",
                "127.0.0.1:0",
                "--run-dir", runDirectory.path,
            ] + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let reader = Thread { [self] in
            let handle = output.fileHandleForReading
            while true {
                let piece = handle.availableData
                if piece.isEmpty { break }
                lock.withLock { logText += String(decoding: piece, as: UTF8.self) }
            }
        }
        reader.start()
        let deadline = ContinuousClock.now + .seconds(90)
        while port == 0 {
            let text = log
            if let range = text.range(of: "listening for devices on port ") {
                let digits = text[range.upperBound...].prefix { $0.isNumber }
                port = Int(digits) ?? 0
                break
            }
            guard process.isRunning, ContinuousClock.now < deadline else {
                stop()
                throw CoordinatorError(
                    description: "the coordinator did not start listening:\n\(text)")
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    var address: String { "127.0.0.1:\(port)" }

    var log: String { lock.withLock { logText } }

    /// Waits for the coordinator to exit by itself; its exit status, or nil on timeout.
    func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning {
            if ContinuousClock.now > deadline { return nil }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return process.terminationStatus
    }

    /// SIGTERM if still running, and wait.
    func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }

    func model(round: Int) -> String {
        runDirectory.appendingPathComponent("models")
            .appendingPathComponent(String(format: "round-%04d.mlmodel", round)).path
    }

    /// The JSON objects of metrics.jsonl, one per round (round 0: the initial model).
    func metrics() throws -> [[String: Any]] {
        let text = try String(
            contentsOf: runDirectory.appendingPathComponent("metrics.jsonl"), encoding: .utf8)
        return try text.split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
    }
}

/// A fresh temporary directory, removed by the caller.
func temporaryDirectory(_ name: String) throws -> URL {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("fedcoreml-\(name)-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}
