// DeviceAgent against the in-memory fake coordinator, on a virtual clock: the loop, resume,
// verification, retry-after, backoff, typed refusals, sessions, eligibility and cancellation.
// The same cases as tests/test_device_client.py for the Python DeviceClient.
import FedCoreML
import Foundation
import Testing

@Suite struct DeviceAgentTests {
    let model = sampleModel()
    let other = sampleModel(size: 150_001, seed: 9)

    @Test func runsTrainAndEvaluateTasksUntilFinished() async throws {
        let fake = FakeTransport(
            script: [waitAnswer(30), trainTask("t1", model), evaluateTask("e1", other)],
            models: ["t1": model, "e1": other])
        fake.pacing.chunkBytes = 1000
        let trainer = FixedTrainer(tensors: try sampleTensors())
        let clock = TestClock()
        let log = EventLog()
        let directory = scratchDirectory()
        let agent = makeAgent(
            fake, trainer: trainer, clock: clock, log: log, token: "fcm_secret",
            modelDirectory: directory)

        let stats = try await agent.run()

        #expect(stats.finished && stats.registrations == 1 && stats.polls == 4)
        #expect(stats.tasksTrained == 1 && stats.tasksEvaluated == 1 && stats.failures == 0)
        #expect(stats.waits == 1 && stats.lastRound == 1 && stats.lastAccuracy == 0.6)
        #expect(await agent.state == .done)
        // The Wait's retry_after_ms, exactly, before the next GetTask.
        #expect(log.sleeps.map(\.0) == [.milliseconds(30)] && log.sleeps.map(\.1) == [.told])
        // The trainer got the verified bytes as a file, which is gone afterwards.
        #expect(trainer.trainedFiles.map(\.sha256) == [SHA256Digest.hex(of: model)])
        #expect(trainer.evaluatedFiles.map(\.sha256) == [SHA256Digest.hex(of: other)])
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
        // Every weight and bias arrived exactly, in slices within the server's chunk size.
        let update = try #require(fake.updates["t1"])
        #expect(update.header.numExamples == 120 && update.header.loss == 0.5)
        #expect(update.header.numTensors == 4 && update.header.sessionId == "session-1")
        for tensor in try sampleTensors() {
            #expect(update.tensors[tensor.name]?.values == tensor.values)
            #expect(update.tensors[tensor.name]?.shape == tensor.shape.map { UInt32($0) })
        }
        #expect(update.sliceSizes.max() == 1000)
        #expect(fake.evaluations["e1"]?.numExamples == 30)
        // The token on every call; the registration says who the device is.
        #expect(fake.metadataSeen.allSatisfy { $0 == ["authorization: Bearer fcm_secret"] })
        #expect(fake.registrations.first?.deviceId == "swift-0")
        #expect(fake.registrations.first?.platform == "iOS")
        // GetTask is given a deadline beyond the server's long poll.
        #expect(fake.getTaskOptions.allSatisfy { $0.timeout >= .seconds(7) })
    }

    @Test func aCutDownloadResumesFromItsOffsetAndVerifies() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.breakDownloads = 1
        let trainer = FixedTrainer(tensors: try sampleTensors())
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: trainer, clock: TestClock(), log: log).run()

        #expect(fake.downloadOffsets.map(\.offset) == [0, UInt64(fake.downloadChunk)])
        #expect(
            log.events.contains(.downloadStarted(taskId: "t1", offset: UInt64(fake.downloadChunk))))
        #expect(log.events.contains(.modelVerified(taskId: "t1", bytes: model.count)))
        #expect(trainer.trainedFiles.map(\.sha256) == [SHA256Digest.hex(of: model)])
        #expect(
            stats.tasksTrained == 1 && stats.retries == 1 && stats.refusals == ["UNAVAILABLE": 1])
        #expect(log.sleeps.map(\.1) == [.backoff])
    }

    @Test func aCorruptedDownloadFailsSha256AndIsFetchedAgain() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.corruptDownloads = 1
        let trainer = FixedTrainer(tensors: try sampleTensors())
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: trainer, clock: TestClock(), log: log).run()

        let rejected = log.events.compactMap {
            if case .modelRejected(_, let reason) = $0 { reason } else { nil }
        }
        #expect(rejected.count == 1 && rejected[0].hasPrefix("sha256 mismatch"))
        #expect(fake.downloadOffsets.map(\.offset) == [0, 0])  // again from the start
        #expect(trainer.trainedFiles.map(\.sha256) == [SHA256Digest.hex(of: model)])
        #expect(stats.tasksTrained == 1 && stats.failures == 0)
    }

    @Test func aModelCorruptedTwiceIsDroppedWithoutTrainingOrSubmitting() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.corruptDownloads = 2
        let trainer = FixedTrainer(tensors: try sampleTensors())
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: trainer, clock: TestClock(), log: log).run()

        #expect(trainer.trainedFiles.isEmpty && fake.updates.isEmpty)
        #expect(stats.failures == 1 && stats.finished)
        #expect(log.dropped.map(\.taskId) == ["t1"] && log.dropped[0].status == nil)
        #expect(log.dropped[0].reason.hasPrefix("sha256 mismatch"))
    }

    @Test func aDownloadOfAnotherSizeThanAnnouncedIsRejected() async throws {
        var ref = modelRef(model)
        ref.sizeBytes += 4
        let task = GetTaskResponse(.train(TrainTask(taskId: "t1", round: 1, model: ref)))
        let fake = FakeTransport(script: [task], models: ["t1": model])
        let log = EventLog()
        let agent = makeAgent(
            fake, trainer: FixedTrainer(tensors: []), clock: TestClock(), log: log)
        try await agent.register()
        await #expect(throws: ModelVerificationError.self) {
            try await agent.downloadModel(taskId: "t1", ref: ref)
        }
    }

    @Test func retryAfterIsHonouredExactlyAndTheSameCallIsRetried() async throws {
        let fake = FakeTransport(script: [], models: [:])
        fake.throttleGetTaskMs = [250, 1250]
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: nil, clock: TestClock(), log: log).run()

        #expect(log.sleeps.map(\.0) == [.milliseconds(250), .milliseconds(1250)])
        #expect(log.sleeps.map(\.1) == [.throttled, .throttled])
        #expect(stats.throttled == 2 && stats.finished && fake.getTaskRequests.count == 3)
        let failures = log.events.compactMap { if case .callFailed(let r) = $0 { r } else { nil } }
        #expect(failures.map(\.status) == [.resourceExhausted, .resourceExhausted])
        #expect(failures.first?.retryAfter == .milliseconds(250))
    }

    @Test func unavailableBacksOffExponentiallyWithJitter() async throws {
        let fake = FakeTransport(script: [], models: [:])
        fake.getTaskFaults = [.unavailable, .deadlineExceeded, .unavailable, .unavailable]
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: nil, clock: TestClock(), log: log).run()

        let delays = log.sleeps.map(\.0.seconds)
        #expect(delays.count == 4 && stats.retries == 4 && stats.finished)
        for (n, delay) in delays.enumerated() {
            let ceiling = min(30, 0.5 * Double(1 << n))
            #expect(delay >= ceiling / 2 && delay <= ceiling, "retry \(n): \(delay) s")
        }
        // Jitter: not simply the lower bounds.
        #expect(Set(zip(delays, [0.25, 0.5, 1, 2]).map { $0 == $1 }) != [true])
    }

    @Test func aCoordinatorUnreachableForTooLongIsGivenUpOn() async throws {
        let fake = FakeTransport(script: [], models: [:])
        fake.getTaskFaults = Array(repeating: .unavailable, count: 100)
        let agent = makeAgent(fake, trainer: nil, clock: TestClock(), log: EventLog())
        let error = await #expect(throws: GaveUpError.self) { try await agent.run() }
        #expect(error?.lastRefusal.status == .unavailable)
        #expect(error?.message.contains("gave up after") == true)
        #expect(await agent.stats.error?.contains("gave up") == true)
        #expect(await agent.state == .stopped)
    }

    @Test func everyRefusalIsATypedErrorWithItsStatusAndMessage() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.refuseSubmissions = .invalidArgument
        let agent = makeAgent(fake, trainer: nil, clock: TestClock(), log: EventLog())
        try await agent.register()
        let result = TrainResult(
            tensors: try sampleTensors(), numExamples: 10, loss: 1, accuracy: 0.5, seconds: 1)
        let refusal = await #expect(throws: RefusedError.self) {
            try await agent.submitUpdate(taskId: "t1", result: result)
        }
        #expect(refusal == RefusedError(.submitUpdate, .invalidArgument, "injected refusal"))
        #expect(refusal?.description == "SubmitUpdate refused (INVALID_ARGUMENT): injected refusal")
        #expect(refusal?.isTransient == false && refusal?.isTaskGone == false)

        let evaluation = await #expect(throws: RefusedError.self) {
            try await agent.submitEvaluation(
                taskId: "e1", result: EvaluationResult(numExamples: 1, loss: 1, accuracy: 1))
        }
        #expect(evaluation?.rpc == .submitEvaluation && evaluation?.status == .invalidArgument)

        let download = await #expect(throws: RefusedError.self) {
            try await agent.downloadModel(taskId: "nope", ref: modelRef(model))
        }
        #expect(download?.status == .notFound && download?.message == "unknown task 'nope'")
    }

    @Test(arguments: [StatusCode.invalidArgument, .failedPrecondition, .permissionDenied])
    func aRefusedSubmissionDropsTheTaskAndWorkGoesOn(status: StatusCode) async throws {
        let fake = FakeTransport(
            script: [trainTask("t1", model), trainTask("t2", model, round: 2)],
            models: ["t1": model, "t2": model])
        fake.refuseSubmissions = status
        let log = EventLog()
        let stats = try await makeAgent(
            fake, trainer: FixedTrainer(tensors: try sampleTensors()), clock: TestClock(), log: log
        ).run()

        #expect(stats.failures == 2 && stats.tasksTrained == 0 && stats.finished)
        #expect(log.dropped.map(\.taskId) == ["t1", "t2"])
        #expect(log.dropped.allSatisfy { $0.status == status })
        #expect(log.dropped[0].reason == "SubmitUpdate refused (\(status.name)): injected refusal")
        #expect(stats.refusals == [status.name: 2])
    }

    @Test func unauthenticatedStopsTheAgent() async throws {
        let fake = FakeTransport(script: [], models: [:])
        fake.getTaskFaults = [.unauthenticated]
        let agent = makeAgent(fake, trainer: nil, clock: TestClock(), log: EventLog())
        let refusal = await #expect(throws: RefusedError.self) { try await agent.run() }
        #expect(refusal?.status == .unauthenticated && refusal?.rpc == .getTask)
        #expect(fake.getTaskRequests.count == 1)  // not retried
    }

    @Test func aForgottenSessionRegistersAgain() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.forgetSessions = 1
        let log = EventLog()
        let stats = try await makeAgent(
            fake, trainer: FixedTrainer(tensors: try sampleTensors()), clock: TestClock(), log: log
        ).run()
        #expect(stats.registrations == 2 && stats.tasksTrained == 1)
        #expect(fake.updates["t1"]?.header.sessionId == "session-2")
    }

    @Test func aSessionForgottenAgainAndAgainIsAProtocolError() async throws {
        let fake = FakeTransport(script: [], models: [:])
        fake.forgetSessions = 100
        let log = EventLog()
        let agent = makeAgent(fake, trainer: nil, clock: TestClock(), log: log)
        await #expect(throws: ProtocolError.self) { try await agent.run() }
        #expect(await agent.stats.registrations == 6)
        #expect(log.sleeps.map(\.1) == Array(repeating: .sessionLost, count: 4))
    }

    @Test func aDivergedTrainingIsNotSubmitted() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        let trainer = FixedTrainer(tensors: try sampleTensors())
        trainer.loss = .nan
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: trainer, clock: TestClock(), log: log).run()
        #expect(fake.updates.isEmpty && stats.failures == 1)
        #expect(log.dropped.first?.reason.hasPrefix("training diverged") == true)
    }

    @Test func eligibilityIsReportedAndGatesAskingForWork() async throws {
        final class Battery: EligibilityProvider, @unchecked Sendable {
            private let lock = NSLock()
            private var asked = 0
            func capabilities() async -> DeviceCapabilities {
                // Unplugged for the first three questions (Register and two loop steps).
                let count = lock.withLock {
                    asked += 1
                    return asked
                }
                return DeviceCapabilities(
                    charging: count > 3, unmeteredNetwork: true, batteryLevel: 0.4)
            }
        }
        let fake = FakeTransport(script: [], models: [:])
        let log = EventLog()
        let agent = makeAgent(
            fake, trainer: nil, clock: TestClock(), log: log,
            rule: EligibilityRule(requireCharging: true, minimumBattery: 0.2),
            eligibility: Battery())
        let stats = try await agent.run()

        #expect(stats.finished)
        #expect(log.events.filter { $0 == .ineligible(reason: "not charging") }.count == 2)
        #expect(log.sleeps.map(\.1) == [.ineligible, .ineligible])
        #expect(fake.registrations[0].capabilities.charging == false)
        #expect(fake.getTaskRequests.allSatisfy { $0.capabilities.charging })
        #expect(fake.getTaskRequests.first?.capabilities.batteryLevel == 0.4)
        #expect(
            EligibilityRule(minimumBattery: 0.5).refusal(
                DeviceCapabilities(
                    charging: true, unmeteredNetwork: true, batteryLevel: 0.3)) == "battery at 0.3")
        #expect(
            EligibilityRule().refusal(
                DeviceCapabilities(
                    charging: true, unmeteredNetwork: false, batteryLevel: 1))
                == "not on an unmetered network")
    }

    @Test func cancellationMidSubmissionCutsTheStreamAndSubmitsNothing() async throws {
        let fake = FakeTransport(script: [trainTask("t1", model)], models: ["t1": model])
        fake.pacing.chunkBytes = 400  // many slices
        let reachedSecond = AsyncStream<Void>.makeStream()
        fake.onUpdateMessage = { count in
            if count == 2 {
                reachedSecond.continuation.yield()
                // Hold the upload here until the agent is cancelled.
                try? await Task.sleep(for: .seconds(60))
            }
        }
        let log = EventLog()
        let agent = makeAgent(
            fake, trainer: FixedTrainer(tensors: try sampleTensors()), clock: TestClock(), log: log)
        let running = Task { try await agent.run() }
        var iterator = reachedSecond.stream.makeAsyncIterator()
        await iterator.next()
        #expect(await agent.state == .submitting(taskId: "t1"))
        running.cancel()

        await #expect(throws: CancellationError.self) { try await running.value }
        #expect(fake.updates.isEmpty)  // nothing accepted
        #expect(fake.abortedUploads == [2])  // the stream was cut, not ended
        #expect(await agent.state == .stopped)
        #expect(!log.events.contains { if case .submitted = $0 { true } else { false } })
    }

    @Test func cancellationWhileWaitingStopsAtOnce() async throws {
        let fake = FakeTransport(script: [waitAnswer(60_000)], models: [:])
        let agent = makeAgent(fake, trainer: nil, clock: SystemClock(), log: EventLog())
        let running = Task { try await agent.run() }
        while await agent.state != .waiting { try await Task.sleep(for: .milliseconds(5)) }
        let start = ContinuousClock.now
        running.cancel()
        await #expect(throws: CancellationError.self) { try await running.value }
        #expect(ContinuousClock.now - start < .seconds(5))  // not the 60 s it was told to wait
        #expect(fake.getTaskRequests.count == 1)
    }

    @Test func aTrainerCanAbandonATask() async throws {
        struct Quitter: ModelTrainer {
            func train(modelFile: URL, task: TrainTask) async throws -> TrainResult {
                throw TaskAbandonedError("battery dropped below 20 %")
            }
            func evaluate(modelFile: URL, task: EvaluateTask) async throws -> EvaluationResult {
                throw TaskAbandonedError("no held-out data")
            }
        }
        let fake = FakeTransport(
            script: [trainTask("t1", model), evaluateTask("e1", model)],
            models: ["t1": model, "e1": model])
        let log = EventLog()
        let stats = try await makeAgent(fake, trainer: Quitter(), clock: TestClock(), log: log)
            .run()
        #expect(stats.failures == 2 && stats.finished)
        #expect(log.dropped.map(\.reason) == ["battery dropped below 20 %", "no held-out data"])
    }

    @Test func deviceIdRuleMatchesTheCoordinators() {
        #expect(isValidDeviceId("sim-000") && isValidDeviceId("A1:b2.c_3-"))
        #expect(isValidDeviceId(String(repeating: "x", count: 128)))
        #expect(!isValidDeviceId("") && !isValidDeviceId(String(repeating: "x", count: 129)))
        #expect(!isValidDeviceId("has space") && !isValidDeviceId("é"))
    }

    @Test func retryPolicyRefusesNonPositiveDurations() {
        #expect(throws: ProtocolError.self) { try RetryPolicy(initialBackoff: .zero) }
        #expect(throws: ProtocolError.self) { try RetryPolicy(giveUpAfter: .seconds(-1)) }
    }
}
