// Starts ios_bridge/stdio_bridge.py as a child process and talks to it over its stdin/stdout:
// a JSONLinesTransport to a real coordinator, for Linux and macOS (iOS has no child processes).
#if os(Linux) || os(macOS)
    import FedCoreML
    import Foundation

    #if canImport(Glibc)
        import Glibc
    #elseif canImport(Darwin)
        import Darwin
    #endif

    /// A running `python -m fedcoreml.ios_bridge.stdio_bridge` and the transport over it.
    public final class StdioBridge: @unchecked Sendable {
        public let process: Process
        public let transport: JSONLinesTransport

        /// Starts the bridge to the coordinator at `server` ("host:port"); TLS when `caCert`
        /// (a PEM file) is given. `python` is the interpreter with fedcoreml installed
        /// (default: $FEDCOREML_PYTHON, else python3 on the PATH). The bridge's log goes to
        /// this process's standard error.
        public static func launch(
            server: String, caCert: String? = nil, python: String? = nil
        ) throws -> StdioBridge {
            // A bridge that died must fail the next write with an error, not kill this process.
            signal(SIGPIPE, SIG_IGN)
            let interpreter =
                python ?? ProcessInfo.processInfo.environment["FEDCOREML_PYTHON"] ?? "python3"
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments =
                [interpreter, "-m", "fedcoreml.ios_bridge.stdio_bridge", "--server", server]
                + (caCert.map { ["--ca-cert", $0] } ?? [])
            let requests = Pipe()
            let replies = Pipe()
            process.standardInput = requests
            process.standardOutput = replies
            process.standardError = FileHandle.standardError
            do {
                try process.run()
            } catch {
                throw BridgeError(
                    "cannot start \(interpreter) -m fedcoreml.ios_bridge.stdio_bridge: \(error)")
            }
            let transport = JSONLinesTransport(
                input: replies.fileHandleForReading, output: requests.fileHandleForWriting)
            return StdioBridge(process: process, transport: transport)
        }

        private init(process: Process, transport: JSONLinesTransport) {
            self.process = process
            self.transport = transport
        }

        /// Ends the bridge (it cancels its calls in flight) and waits for it to exit.
        public func close() {
            transport.close()
            process.waitUntilExit()
        }
    }
#endif
