// Trained parameters as the protocol carries them: named float32 tensors in Core ML layout
// (convolution weights [outC, kC, kH, kW], inner product [out, in], biases [out]), and their
// little-endian bytes.
import Foundation

/// One updatable tensor: `"<layer>.weights"` or `"<layer>.bias"`, its shape and its values in
/// row-major order.
public struct NamedTensor: Sendable, Equatable {
    public let name: String
    public let shape: [Int]
    public let values: [Float]

    /// Throws ``TensorError`` when the values do not fill the shape exactly.
    public init(name: String, shape: [Int], values: [Float]) throws {
        guard !name.isEmpty else { throw TensorError("a tensor needs a name") }
        guard shape.allSatisfy({ $0 >= 0 }), shape.allSatisfy({ $0 <= Int(UInt32.max) }) else {
            throw TensorError("tensor \(name): shape \(shape) has a dimension outside 0...2^32-1")
        }
        let count = shape.reduce(1, *)
        guard count == values.count else {
            throw TensorError(
                "tensor \(name): shape \(shape) holds \(count) values, got \(values.count)")
        }
        self.name = name
        self.shape = shape
        self.values = values
    }

    /// The values as float32 little-endian bytes, the wire format.
    public var littleEndianBytes: Data { packFloat32LittleEndian(values) }

    /// Whether every value is finite (the coordinator refuses NaN and Inf).
    public var isFinite: Bool { values.allSatisfy(\.isFinite) }
}

/// A tensor whose name, shape or values do not fit together.
public struct TensorError: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// `values` as float32 little-endian bytes, whatever the host's byte order.
public func packFloat32LittleEndian(_ values: [Float]) -> Data {
    var data = Data(count: values.count * 4)
    data.withUnsafeMutableBytes { raw in
        for (index, value) in values.enumerated() {
            raw.storeBytes(
                of: value.bitPattern.littleEndian, toByteOffset: index * 4, as: UInt32.self)
        }
    }
    return data
}

/// Float32 little-endian bytes as values; nil when the length is not a multiple of 4.
public func unpackFloat32LittleEndian(_ data: Data) -> [Float]? {
    guard data.count % 4 == 0 else { return nil }
    return data.withUnsafeBytes { raw in
        (0..<data.count / 4).map { index in
            Float(
                bitPattern: UInt32(
                    littleEndian: raw.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self)))
        }
    }
}
