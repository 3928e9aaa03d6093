// Swift agents against a real `fedcoreml server` on 127.0.0.1, through the stdio bridge
// (ios_bridge/stdio_bridge.py makes the gRPC calls): the run completes, every round's model is
// the examples-weighted mean of what the agents submitted, cut and corrupted downloads recover,
// retry-after is honoured, refusals are typed, and a cancelled submission leaves nothing behind.
import FedCoreML
import FedCoreMLStdio
import Foundation
import Testing

@Suite(
    .serialized,
    .enabled(
        if: fedcoremlInstalled,
        "needs fedcoreml in python3 (pip install -e '.[dev,simulation]' at the repository root)")
)
struct EndToEndTests {
    @Test(.timeLimit(.minutes(5)))
    func threeAgentsRunTwoRoundsAndEachModelIsTheWeightedMeanOfTheirUpdates() async throws {
        let directory = try temporaryDirectory("e2e-run")
        defer { try? FileManager.default.removeItem(at: directory) }
        let coordinator = try Coordinator(
            runDirectory: directory.appendingPathComponent("run"),
            arguments: [
                "--insecure", "--rounds", "2", "--min-devices", "3", "--fraction-evaluate", "1",
                "--round-timeout", "60", "--poll-interval-ms", "250",
                // Two tasks a second: devices are told to come back at their own slot.
                "--handout-rate", "2",
            ])
        defer { coordinator.stop() }
        let bridge = try StdioBridge.launch(server: coordinator.address)
        defer { bridge.close() }

        // A device id outside the rule is refused at Register: INVALID_ARGUMENT, typed.
        let invalid = await #expect(throws: RefusedError.self) {
            try await DeviceAgent(
                transport: bridge.transport, trainer: nil,
                configuration: AgentConfiguration(deviceId: "not a valid id")
            ).register()
        }
        #expect(invalid?.status == .invalidArgument && invalid?.rpc == .register)
        #expect(!isValidDeviceId("not a valid id"))

        let transports = [
            FaultyTransport(bridge.transport, cutDownloads: 1),
            FaultyTransport(bridge.transport, corruptDownloads: 1),
            FaultyTransport(bridge.transport),
        ]
        let trainers = (0..<3).map { OffsetTrainer(bridge: bridge.transport, device: $0) }
        let events = (0..<3).map { _ in Events() }
        let agents = (0..<3).map { i in
            DeviceAgent(
                transport: transports[i], trainer: trainers[i],
                configuration: AgentConfiguration(
                    deviceId: "swift-\(i)", platform: "iOS", osVersion: "18.0",
                    appVersion: "e2e",
                    modelDirectory: directory.appendingPathComponent("device-\(i)")),
                onEvent: events[i].record)
        }
        let stats = try await withThrowingTaskGroup(of: (Int, AgentStats).self) { group in
            for (i, agent) in agents.enumerated() {
                group.addTask { (i, try await agent.run()) }
            }
            var all: [Int: AgentStats] = [:]
            for try await (i, stats) in group { all[i] = stats }
            return (0..<3).map { all[$0]! }
        }

        // The run completes: the coordinator exits by itself once every device was told.
        let status = await coordinator.waitForExit(timeout: .seconds(60))
        try #require(status == 0, "coordinator log:\n\(coordinator.log)")
        for (i, stats) in stats.enumerated() {
            #expect(stats.finished && stats.tasksTrained == 2 && stats.tasksEvaluated == 2, "\(i)")
            #expect(stats.failures == 0 && stats.error == nil, "\(i): \(stats)")
            // GetTask's deadline outlasts the 2 s long polls: never DEADLINE_EXCEEDED.
            #expect(stats.refusals["DEADLINE_EXCEEDED"] == nil, "\(i): \(stats.refusals)")
        }

        // Device 0's first download was cut after its first chunk: it resumed from that offset
        // and the bytes verified.
        let offsets0 = transports[0].recordedOffsets
        #expect(offsets0.count >= 2 && offsets0[0] == 0 && offsets0[1] == 1 << 20, "\(offsets0)")
        #expect(
            events[0].all.contains(.downloadStarted(taskId: firstTask(events[0]), offset: 1 << 20)))
        #expect(stats[0].retries >= 1 && stats[0].refusals["UNAVAILABLE", default: 0] >= 1)
        // Device 1's first download was corrupted: sha256 failed and it was fetched again.
        let rejected = events[1].all.compactMap {
            if case .modelRejected(_, let reason) = $0 { reason } else { nil }
        }
        #expect(rejected.count == 1 && rejected[0].hasPrefix("sha256 mismatch"), "\(rejected)")
        #expect(Array(transports[1].recordedOffsets.prefix(2)) == [0, 0])
        for i in 0..<3 {
            let verified = events[i].all.filter {
                if case .modelVerified = $0 { true } else { false }
            }
            #expect(verified.count == 4, "device \(i): 2 train + 2 evaluate models")
        }

        // Retry-after: after every Wait, the next GetTask came no sooner than it said.
        var waits = 0
        for transport in transports {
            let polls = transport.recordedPolls
            for (poll, next) in zip(polls, polls.dropFirst()) {
                guard case .wait(let wait)? = poll.answer?.task else { continue }
                waits += 1
                let told = Duration.milliseconds(wait.retryAfterMs == 0 ? 250 : wait.retryAfterMs)
                #expect(
                    next.start - poll.end >= told,
                    "told \(told), came back \(next.start - poll.end)")
            }
        }
        #expect(waits >= 2, "the hand-out schedule should have made devices wait")
        print(
            "e2e: download offsets \(offsets0) (cut) and \(transports[1].recordedOffsets) "
                + "(corrupted); \(waits) Wait answers honoured")

        // The layout an app bundles (the layout tool's JSON) names every tensor the coordinator
        // reads from its model, with the same shapes.
        let printed = try runPython(
            module: "fedcoreml.ios_bridge.stdio_bridge", ["--layout", coordinator.model(round: 0)])
        let layout = try JSONDecoder().decode(ModelLayout.self, from: Data(printed.utf8))
        let initial = try await bridge.transport.modelParameters(path: coordinator.model(round: 0))
        #expect(layout.tensors.map { $0.name } == initial.map(\.name))
        #expect(layout.tensors.map { $0.shape } == initial.map(\.shape))

        // Every round's model is the examples-weighted mean of the updates the agents sent.
        let metrics = try coordinator.metrics()
        for round in 1...2 {
            let updates = (0..<3).flatMap { i in
                events[i].accepted.filter { $0.round == UInt32(round) }.compactMap {
                    trainers[i].result(of: $0.taskId)?.result
                }
            }
            #expect(updates.count == 3, "round \(round)")
            let model = try await bridge.transport.modelParameters(
                path: coordinator.model(round: round))
            let previous = try await bridge.transport.modelParameters(
                path: coordinator.model(round: round - 1))
            #expect(model.count == 8 && model.map(\.name) == previous.map(\.name))
            #expect(model != previous)
            let (values, maxUlps) = try compareWithWeightedMean(model: model, updates: updates)
            #expect(values == 585_958, "every weight and bias of the model")
            #expect(maxUlps == 0, "round \(round): off by \(maxUlps) ulp(s)")
            print(
                "e2e: round \(round) model = weighted mean of \(updates.count) Swift updates "
                    + "(\(values) values, max difference \(maxUlps) ulp)")
            let line = try #require(metrics.first { ($0["round"] as? Int) == round })
            #expect(line["devices_reported"] as? Int == 3)
            #expect(line["examples"] as? Int == updates.reduce(0) { $0 + $1.numExamples })
        }
    }

    @Test(.timeLimit(.minutes(5)))
    func typedRefusalsRateLimitsAndACancelledSubmissionAgainstATokenCoordinator() async throws {
        let directory = try temporaryDirectory("e2e-refusals")
        defer { try? FileManager.default.removeItem(at: directory) }
        let run = directory.appendingPathComponent("run")
        let tokenFile = directory.appendingPathComponent("tokens.json")
        try runFedcoreml([
            "tokens", "create", "--run-dir", run.path, "--device", "swift-0", "--device", "swift-1",
            "--device", "swift-2", "--out", tokenFile.path,
        ])
        let tokens = try JSONDecoder().decode(
            [String: String].self, from: Data(contentsOf: tokenFile))
        let coordinator = try Coordinator(
            runDirectory: run,
            arguments: [
                "--insecure", "--require-tokens", "--rate-limit", "10", "--rounds", "1",
                "--min-devices", "3", "--round-timeout", "60", "--long-poll-ms", "0",
                "--poll-interval-ms", "300",
            ])
        defer { coordinator.stop() }
        let bridge = try StdioBridge.launch(server: coordinator.address)
        defer { bridge.close() }

        func agent(
            _ id: String, token: String?, transport: any DeviceTransport,
            trainer: (any ModelTrainer)?,
            events: Events = Events()
        ) -> DeviceAgent {
            DeviceAgent(
                transport: transport, trainer: trainer,
                configuration: AgentConfiguration(
                    deviceId: id, appVersion: "e2e", token: token,
                    modelDirectory: directory.appendingPathComponent(id)),
                onEvent: events.record)
        }

        // No token, an unknown token, another device's token: typed refusals, status and message.
        let noToken = await #expect(throws: RefusedError.self) {
            try await agent("swift-0", token: nil, transport: bridge.transport, trainer: nil)
                .register()
        }
        #expect(noToken?.status == .unauthenticated && noToken?.message == "missing bearer token")
        let unknown = await #expect(throws: RefusedError.self) {
            try await agent(
                "swift-0", token: "fcm_not-a-token", transport: bridge.transport,
                trainer: nil
            ).run()
        }
        #expect(unknown?.status == .unauthenticated && unknown?.rpc == .register)
        #expect(unknown?.message == "unknown or revoked token")
        let stolen = await #expect(throws: RefusedError.self) {
            try await agent(
                "swift-1", token: tokens["swift-0"], transport: bridge.transport,
                trainer: nil
            ).register()
        }
        #expect(stolen?.status == .permissionDenied && stolen?.message.contains("swift-1") == true)

        // A scripted device: a burst of GetTask calls runs into the rate limit, and each
        // throttled call is sent again after exactly the retry-after the coordinator asked for.
        let scriptedEvents = Events()
        let recorder = FaultyTransport(bridge.transport)
        let scripted = agent(
            "swift-0", token: tokens["swift-0"], transport: recorder, trainer: nil,
            events: scriptedEvents)
        try await scripted.register()
        // (10 calls/s after a burst of 20: however slow this machine, enough calls hit the limit)
        var calls = 0
        while calls < 400, await scripted.stats.throttled < 3 {
            _ = try await scripted.getTask()
            calls += 1
        }
        let throttled = scriptedEvents.all.enumerated().compactMap {
            index, event -> (Int, RefusedError)? in
            if case .callFailed(let refusal) = event { (index, refusal) } else { nil }
        }
        #expect(!throttled.isEmpty && throttled.allSatisfy { $0.1.isThrottled })
        #expect(throttled.allSatisfy { $0.1.message.contains("rate limit") })
        for (index, refusal) in throttled {
            #expect(scriptedEvents.all[index + 1] == .slept(refusal.retryAfter!, .throttled))
        }
        let polls = recorder.recordedPolls
        let gaps = zip(polls, polls.dropFirst()).filter { $0.0.answer == nil }.map {
            $1.start - $0.end
        }
        #expect(gaps.count == throttled.count)
        for (gap, (_, refusal)) in zip(gaps, throttled) { #expect(gap >= refusal.retryAfter!) }
        let scriptedStats = await scripted.stats
        print(
            "e2e: \(throttled.count) GetTask calls throttled, retried after "
                + "\(throttled.map { $0.1.retryAfter! }) as asked")
        #expect(scriptedStats.polls == calls && scriptedStats.throttled == throttled.count)
        #expect(throttled.count >= 3)

        // Two agents run the loop meanwhile.
        let trainers = (1...2).map { OffsetTrainer(bridge: bridge.transport, device: $0) }
        let loopEvents = (1...2).map { _ in Events() }
        let loop = Task {
            try await withThrowingTaskGroup(of: AgentStats.self) { group in
                for i in 0..<2 {
                    let device = agent(
                        "swift-\(i + 1)", token: tokens["swift-\(i + 1)"],
                        transport: bridge.transport,
                        trainer: trainers[i], events: loopEvents[i])
                    group.addTask { try await device.run() }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
        }

        // The scripted device takes its task and gets the model.
        let task = try await nextTrainTask(scripted)
        let model = try await scripted.downloadModel(taskId: task.taskId, ref: task.model)
        let file = directory.appendingPathComponent("scripted.mlmodel")
        try model.write(to: file)
        let received = try await bridge.transport.modelParameters(path: file.path)
        let tensors = try received.map {
            try NamedTensor(name: $0.name, shape: $0.shape, values: $0.values.map { $0 - 0.002 })
        }
        let result = TrainResult(
            tensors: tensors, numExamples: 77, loss: 0.4, accuracy: 0.6, seconds: 0.5)

        // A misshapen tensor: INVALID_ARGUMENT, typed, with the coordinator's message.
        var misshapen = tensors
        misshapen[0] = try NamedTensor(
            name: tensors[0].name, shape: [tensors[0].values.count], values: tensors[0].values)
        let invalid = await #expect(throws: RefusedError.self) {
            try await scripted.submitUpdate(
                taskId: task.taskId,
                result: TrainResult(
                    tensors: misshapen, numExamples: 77, loss: 0.4, accuracy: 0.6,
                    seconds: 0.5))
        }
        #expect(invalid?.status == .invalidArgument && invalid?.rpc == .submitUpdate)
        #expect(
            invalid?.message.contains("expected shape") == true, "\(String(describing: invalid))")

        // A submission cancelled after its header and first slice is cut on the wire...
        let header = UpdateHeader(
            sessionId: await scripted.sessionId, taskId: task.taskId, numExamples: 77, loss: 0.4,
            accuracy: 0.6, trainSeconds: 0.5, numTensors: 0)
        let messages = try UpdateMessages(
            header: header, tensors: tensors, chunkBytes: await scripted.chunkBytes())
        let stalled = AsyncStream<Void>.makeStream()
        let cut = Task {
            try await scripted.submitUpdateStream {
                StalledMessages(base: messages, messages: 2, stalled: stalled.continuation)
            }
        }
        var stall = stalled.stream.makeAsyncIterator()
        await stall.next()
        cut.cancel()
        await #expect(throws: CancellationError.self) { try await cut.value }

        // ...so the whole update, sent next, is the first one the coordinator counts,
        let accepted = try await scripted.submitUpdate(taskId: task.taskId, result: result)
        #expect(accepted.accepted && accepted.round == 1)
        // and a second one is refused: FAILED_PRECONDITION, already submitted.
        let again = await #expect(throws: RefusedError.self) {
            try await scripted.submitUpdate(taskId: task.taskId, result: result)
        }
        #expect(again?.status == .failedPrecondition && again?.isTaskGone == true)
        #expect(
            again?.message.contains("already submitted") == true, "\(String(describing: again))")

        // The round closes with the three updates; every device is told the run is finished.
        try await untilFinished(scripted)
        let loopStats = try await loop.value
        #expect(loopStats.allSatisfy { $0.finished && $0.tasksTrained == 1 && $0.failures == 0 })
        let status = await coordinator.waitForExit(timeout: .seconds(60))
        try #require(status == 0, "coordinator log:\n\(coordinator.log)")

        let updates =
            [result]
            + (0..<2).flatMap { i in
                loopEvents[i].accepted.compactMap { trainers[i].result(of: $0.taskId)?.result }
            }
        #expect(updates.count == 3)
        let aggregated = try await bridge.transport.modelParameters(
            path: coordinator.model(round: 1))
        let (values, maxUlps) = try compareWithWeightedMean(model: aggregated, updates: updates)
        #expect(values == 585_958 && maxUlps == 0, "off by \(maxUlps) ulp(s)")
        print("e2e: round 1 model = weighted mean of 3 updates (1 scripted after a cancelled one)")
    }
}

/// The id of the first task an agent was given.
private func firstTask(_ events: Events) -> String {
    for event in events.all {
        if case .answered(let answer) = event, case .train(let task)? = answer.task {
            return task.taskId
        }
    }
    return ""
}

/// Polls (honouring every Wait) until a train task comes.
private func nextTrainTask(_ agent: DeviceAgent) async throws -> TrainTask {
    while true {
        switch try await agent.nextTask().task {
        case .train(let task): return task
        case .wait(let wait):
            try await Task.sleep(for: await agent.pollDelay(retryAfterMs: wait.retryAfterMs))
        case let other:
            throw CoordinatorError(
                description: "expected a train task, got \(String(describing: other))")
        }
    }
}

/// Polls (honouring every Wait) until the coordinator says the run is finished.
private func untilFinished(_ agent: DeviceAgent) async throws {
    while true {
        switch try await agent.nextTask().task {
        case .finished: return
        case .wait(let wait):
            try await Task.sleep(for: await agent.pollDelay(retryAfterMs: wait.retryAfterMs))
        case let other:
            throw CoordinatorError(
                description: "expected the end, got \(String(describing: other))")
        }
    }
}
