// Packing and chunking of an update: every weight and bias as float32 little-endian, header
// first with the tensor count, slices within the chunk size, in order, covering each tensor.
import FedCoreML
import Foundation
import Testing

@Suite struct ChunkingTests {
    @Test func packsFloat32LittleEndian() throws {
        let bytes = packFloat32LittleEndian([1, -2.5, .infinity])
        #expect(Array(bytes) == [0, 0, 0x80, 0x3F, 0, 0, 0x20, 0xC0, 0, 0, 0x80, 0x7F])
        #expect(unpackFloat32LittleEndian(bytes) == [1, -2.5, .infinity])
        #expect(unpackFloat32LittleEndian(Data([1, 2, 3])) == nil)
    }

    @Test func aTensorMustFillItsShape() throws {
        #expect(throws: TensorError.self) {
            try NamedTensor(name: "b", shape: [3], values: [1, 2])
        }
        #expect(throws: TensorError.self) { try NamedTensor(name: "", shape: [1], values: [1]) }
        #expect(throws: TensorError.self) { try NamedTensor(name: "w", shape: [-1], values: []) }
        let scalar = try NamedTensor(name: "s", shape: [], values: [4])
        #expect(scalar.littleEndianBytes.count == 4)
    }

    @Test(arguments: [4, 40, 1000, 1 << 20])
    func slicesCoverEveryTensorInOrderWithinTheChunkSize(chunkBytes: Int) throws {
        let tensors = try sampleTensors()
        let header = UpdateHeader(
            sessionId: "s", taskId: "t", numExamples: 120, loss: 0.5, accuracy: 0.75,
            trainSeconds: 1, numTensors: 0)
        let messages = Array(
            try UpdateMessages(header: header, tensors: tensors, chunkBytes: chunkBytes))

        guard case .header(let sent)? = messages.first?.part else {
            Issue.record("the first message is not the header")
            return
        }
        #expect(sent.numTensors == 4)  // set from the tensors, whatever the caller said
        #expect(sent.numExamples == 120 && sent.taskId == "t")

        let slices = messages.dropFirst().map { message -> TensorChunk in
            guard case .tensor(let slice)? = message.part else { fatalError("a second header") }
            return slice
        }
        #expect(slices.allSatisfy { $0.data.count <= chunkBytes && $0.data.count % 4 == 0 })
        // Tensors in the trainer's order, never interleaved; slices contiguous from 0.
        var order: [String] = []
        for slice in slices where order.last != slice.name { order.append(slice.name) }
        #expect(order == tensors.map(\.name))
        for tensor in tensors {
            let mine = slices.filter { $0.name == tensor.name }
            #expect(mine.allSatisfy { $0.shape == tensor.shape.map { UInt32($0) } })
            var expectedOffset: UInt64 = 0
            for slice in mine {
                #expect(slice.offset == expectedOffset)
                expectedOffset += UInt64(slice.data.count)
            }
            let joined = mine.reduce(Data()) { $0 + $1.data }
            #expect(joined == tensor.littleEndianBytes)
        }
        // The fake's strict reassembly gives back exactly the trainer's values.
        let received = try FakeTransport.reassemble(messages)
        for tensor in tensors {
            #expect(received.tensors[tensor.name]?.values == tensor.values)
        }
    }

    @Test func anEmptyTensorIsSentOnceAsAnEmptySlice() throws {
        let messages = Array(
            try UpdateMessages(
                header: UpdateHeader(),
                tensors: [try NamedTensor(name: "e", shape: [0], values: [])],
                chunkBytes: 8))
        #expect(messages.count == 2)
        #expect(
            messages.last
                == UpdateChunk(.tensor(TensorChunk(name: "e", shape: [0], offset: 0, data: Data())))
        )
    }

    @Test func chunkSizesThatSplitAFloatAndRepeatedNamesAreRefused() throws {
        let tensors = try sampleTensors()
        for bad in [0, 2, 6, -4] {
            #expect(throws: TensorError.self) {
                try UpdateMessages(header: UpdateHeader(), tensors: tensors, chunkBytes: bad)
            }
        }
        #expect(throws: TensorError.self) {
            try UpdateMessages(
                header: UpdateHeader(), tensors: tensors + [tensors[0]], chunkBytes: 8)
        }
    }

    @Test func iteratingAgainStartsFromTheHeader() throws {
        let messages = try UpdateMessages(
            header: UpdateHeader(), tensors: try sampleTensors(), chunkBytes: 64)
        #expect(Array(messages) == Array(messages))
    }

    @Test func theAgentsChunkSizeFollowsThePacingHintsWithinTheMessageLimit() async throws {
        let cases: [(PacingHints, Int)] = [
            (PacingHints(), 1 << 20),  // nothing said: 1 MiB
            (PacingHints(maxMessageBytes: 4 << 20, chunkBytes: 1000), 1000),
            (PacingHints(maxMessageBytes: 4 << 20, chunkBytes: 1002), 1000),  // whole floats
            (PacingHints(maxMessageBytes: 1 << 20, chunkBytes: 2 << 20), (1 << 20) - 64 * 1024),
            (PacingHints(maxMessageBytes: 1000, chunkBytes: 1000), 4),  // never below one float
        ]
        for (pacing, expected) in cases {
            let fake = FakeTransport(script: [], models: [:])
            fake.pacing = pacing
            let agent = makeAgent(fake, trainer: nil, clock: TestClock(), log: EventLog())
            try await agent.register()
            #expect(await agent.chunkBytes() == expected, "\(pacing)")
        }
    }
}
