// The messages in the proto3 JSON mapping: what Python's json_format writes is read field for
// field, and what Swift writes reads back the same and follows the mapping's rules.
import FedCoreML
import Foundation
import Testing

private func json(_ text: String) -> Data { Data(text.utf8) }

private func object<M: ProtoMessage>(_ message: M) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: message.jsonData()) as! [String: Any]
}

@Suite struct ProtoJSONTests {
    @Test func readsWhatPythonJsonFormatWrites() throws {
        // Lines written by google.protobuf.json_format.MessageToJson for the same messages.
        let task = try GetTaskResponse(
            jsonData: json(
                #"{"train": {"taskId": "t1", "round": 3, "model": {"version": "2", "#
                    + #""sha256": "ab", "sizeBytes": "2345678901234"}, "config": {"epochs": 1, "#
                    + #""batchSize": 16, "learningRate": 0.001}, "deadlineMs": 60000}}"#))
        #expect(
            task
                == GetTaskResponse(
                    .train(
                        TrainTask(
                            taskId: "t1", round: 3,
                            model: ModelRef(version: 2, sha256: "ab", sizeBytes: 2_345_678_901_234),
                            config: TrainConfig(epochs: 1, batchSize: 16, learningRate: 0.001),
                            deadlineMs: 60_000))))

        let slice = try UpdateChunk(
            jsonData: json(
                #"{"tensor": {"name": "conv1.bias", "shape": [4], "offset": "8", "#
                    + #""data": "AACAP/8="}}"#))
        #expect(
            slice
                == UpdateChunk(
                    .tensor(
                        TensorChunk(
                            name: "conv1.bias", shape: [4], offset: 8,
                            data: Data([0, 0, 128, 63, 255])))))

        let header = try UpdateChunk(
            jsonData: json(
                #"{"header": {"sessionId": "s", "taskId": "t", "numExamples": "120", "loss": 0.1, "#
                    + #""accuracy": "NaN", "trainSeconds": "Infinity", "numTensors": 8}}"#))
        guard case .header(let h)? = header.part else {
            Issue.record("not a header: \(header)")
            return
        }
        #expect(h.numExamples == 120 && h.loss == 0.1 && h.accuracy.isNaN)
        #expect(h.trainSeconds == .infinity && h.numTensors == 8)

        #expect(
            try GetTaskResponse(jsonData: json(#"{"wait": {}}"#)) == GetTaskResponse(.wait(Wait())))
        let register = try RegisterRequest(
            jsonData: json(
                #"{"deviceId": "d", "capabilities": {"charging": true, "batteryLevel": -1.0}}"#))
        #expect(register.deviceId == "d" && register.capabilities.charging)
        #expect(register.capabilities.batteryLevel == -1 && !register.capabilities.unmeteredNetwork)
    }

    @Test func acceptsProtoNamesNumbersForIntegersAndUnpaddedBase64() throws {
        #expect(try Wait(jsonData: json(#"{"retry_after_ms": 250}"#)).retryAfterMs == 250)
        let ref = try ModelRef(jsonData: json(#"{"version": 4, "size_bytes": "12"}"#))
        #expect(ref.version == 4 && ref.sizeBytes == 12)
        let chunk = try ModelChunk(jsonData: json(#"{"data": "AACAP_8", "totalSize": 5}"#))
        #expect(chunk.data == Data([0, 0, 128, 63, 255]))
        #expect(try Wait(jsonData: json(#"{"retryAfterMs": null}"#)).retryAfterMs == 0)
    }

    @Test func writesTheMappingsForms() throws {
        let written = try object(
            UpdateChunk(
                .header(
                    UpdateHeader(
                        sessionId: "s", taskId: "t", numExamples: 120, loss: 0.5, accuracy: .nan,
                        trainSeconds: 0, numTensors: 8))))
        let header = written["header"] as! [String: Any]
        #expect(header["numExamples"] as? String == "120")  // uint64: a decimal string
        #expect(header["accuracy"] as? String == "NaN")
        #expect(header["numTensors"] as? Int == 8)  // uint32: a number
        #expect(header["trainSeconds"] == nil)  // defaults are omitted
        #expect(
            Set(header.keys) == [
                "sessionId", "taskId", "numExamples", "loss", "accuracy", "numTensors",
            ])

        let slice = try object(
            TensorChunk(name: "b", shape: [2], offset: 0, data: Data([1, 2, 3])))
        #expect(slice["data"] as? String == "AQID")
        #expect(slice["offset"] == nil)

        // A oneof member that holds only defaults is still written: its presence is the answer.
        #expect(try object(GetTaskResponse(.wait(Wait()))).keys.sorted() == ["wait"])
        #expect(try object(GetTaskResponse()).isEmpty)
    }

    @Test func everyMessageRoundTrips() throws {
        let model = ModelRef(version: .max, sha256: "00ff", sizeBytes: 1 << 40)
        try roundTrip(
            RegisterRequest(
                deviceId: "d-1", platform: "iOS", osVersion: "18.1", appVersion: "2.0",
                capabilities: DeviceCapabilities(
                    charging: true, unmeteredNetwork: true,
                    batteryLevel: 0.5)))
        try roundTrip(
            RegisterResponse(
                sessionId: "s",
                pacing: PacingHints(
                    pollIntervalMs: 500, maxMessageBytes: 4 << 20, chunkBytes: 1 << 20,
                    sessionTtlMs: 30_000, longPollMs: 2_000)))
        try roundTrip(
            GetTaskRequest(
                sessionId: "s",
                capabilities: DeviceCapabilities(
                    charging: false, unmeteredNetwork: true, batteryLevel: -1)))
        try roundTrip(
            GetTaskResponse(
                .train(
                    TrainTask(
                        taskId: "t", round: 2, model: model,
                        config: TrainConfig(epochs: 3, batchSize: 32, learningRate: 1e-6),
                        deadlineMs: 9))))
        try roundTrip(
            GetTaskResponse(
                .evaluate(
                    EvaluateTask(
                        taskId: "t", round: 2, model: model, deadlineMs: 1))))
        try roundTrip(GetTaskResponse(.wait(Wait(retryAfterMs: 250, reason: "slot"))))
        try roundTrip(GetTaskResponse(.finished(RunFinished(reason: "done", finalModel: model))))
        try roundTrip(DownloadModelRequest(sessionId: "s", taskId: "t", offset: 1 << 33))
        try roundTrip(ModelChunk(offset: 5, data: Data(0..<255), totalSize: 260, sha256: "ab"))
        try roundTrip(
            UpdateChunk(
                .header(
                    UpdateHeader(
                        sessionId: "s", taskId: "t", numExamples: 7, loss: -.infinity, accuracy: 1,
                        trainSeconds: 0.125, numTensors: 2))))
        try roundTrip(
            UpdateChunk(
                .tensor(
                    TensorChunk(
                        name: "fc.weights", shape: [10, 500], offset: 4096,
                        data: Data(repeating: 9, count: 12)))))
        try roundTrip(SubmitUpdateResponse(accepted: true, round: 4))
        try roundTrip(
            SubmitEvaluationRequest(
                sessionId: "s", taskId: "t", numExamples: 30, loss: 0.7, accuracy: 0.6))
        try roundTrip(SubmitEvaluationResponse(accepted: true))
    }

    private func roundTrip<M: ProtoMessage>(_ message: M) throws {
        #expect(try M(jsonData: message.jsonData()) == message, "\(M.self)")
    }

    @Test func refusesWhatTheMappingDoesNotAllow() {
        #expect(throws: DecodingError.self) {
            try GetTaskResponse(jsonData: json(#"{"wait": {}, "finished": {}}"#))
        }
        #expect(throws: DecodingError.self) {
            try UpdateChunk(jsonData: json(#"{"header": {}, "tensor": {}}"#))
        }
        #expect(throws: DecodingError.self) { try ModelChunk(jsonData: json(#"{"data": "***"}"#)) }
        #expect(throws: DecodingError.self) { try ModelRef(jsonData: json(#"{"version": "-1"}"#)) }
        #expect(throws: DecodingError.self) { try Wait(jsonData: json(#"{"retryAfterMs": "x"}"#)) }
    }
}
