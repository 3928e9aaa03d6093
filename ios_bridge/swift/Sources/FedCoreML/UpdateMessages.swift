// The messages of one SubmitUpdate stream: the header (with the tensor count), then every tensor
// as float32 little-endian slices of at most `chunkBytes` bytes, in order, tensors never
// interleaved (the rules in protos/README.md, as ios_bridge/tensor_codec.py encodes them).
import Foundation

/// The SubmitUpdate stream of one update, produced lazily: one tensor's bytes at a time.
///
/// Iterating it again starts again from the header, so a retried call sends the same stream.
/// The async iteration throws `CancellationError` once the iterating task is cancelled, so a
/// transport aborts the call instead of ending a cut stream as if it were complete.
public struct UpdateMessages: AsyncSequence, Sequence, Sendable {
    public typealias Element = UpdateChunk

    public let header: UpdateHeader
    public let tensors: [NamedTensor]
    public let chunkBytes: Int

    /// `header.numTensors` is set to the number of tensors; `chunkBytes` must be a positive
    /// multiple of 4 (slices hold whole float32 values).
    public init(header: UpdateHeader, tensors: [NamedTensor], chunkBytes: Int) throws {
        guard chunkBytes >= 4, chunkBytes % 4 == 0 else {
            throw TensorError(
                "chunk size must be a positive multiple of 4 bytes, got \(chunkBytes)")
        }
        var names = Set<String>()
        for tensor in tensors where !names.insert(tensor.name).inserted {
            throw TensorError("tensor \(tensor.name) appears twice in the update")
        }
        var header = header
        header.numTensors = UInt32(tensors.count)
        self.header = header
        self.tensors = tensors
        self.chunkBytes = chunkBytes
    }

    public struct Iterator: IteratorProtocol {
        let messages: UpdateMessages
        var headerSent = false
        var tensorIndex = 0
        var offset = 0
        var bytes: Data?

        public mutating func next() -> UpdateChunk? {
            if !headerSent {
                headerSent = true
                return UpdateChunk(.header(messages.header))
            }
            while tensorIndex < messages.tensors.count {
                let tensor = messages.tensors[tensorIndex]
                let payload = bytes ?? tensor.littleEndianBytes
                bytes = payload
                // An empty tensor still goes out once, as an empty slice at offset 0.
                if offset < payload.count || (offset == 0 && payload.isEmpty) {
                    let end = Swift.min(offset + messages.chunkBytes, payload.count)
                    let slice = TensorChunk(
                        name: tensor.name,
                        shape: tensor.shape.map { UInt32($0) },
                        offset: UInt64(offset),
                        data: Data(payload[payload.startIndex + offset..<payload.startIndex + end])
                    )
                    offset = end
                    if payload.isEmpty { offset = 1 }
                    return UpdateChunk(.tensor(slice))
                }
                tensorIndex += 1
                offset = 0
                bytes = nil
            }
            return nil
        }
    }

    public func makeIterator() -> Iterator { Iterator(messages: self) }

    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: Iterator

        public mutating func next() async throws -> UpdateChunk? {
            try Task.checkCancellation()
            return base.next()
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: makeIterator()) }
}
