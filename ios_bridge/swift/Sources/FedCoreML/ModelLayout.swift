// The updatable tensors a model declares, in Core ML layout: what a trainer must send back, by
// name and shape. An app bundles it as JSON next to its model, written by
// `python -m fedcoreml.ios_bridge.stdio_bridge --layout MODEL.mlmodel` (the coordinator's own
// reading of the spec), because Core ML itself does not list a layer's declared shape.
import Foundation

/// Every updatable weight and bias of a model: `{"tensors": [{"name": "conv1.weights",
/// "shape": [32, 1, 3, 3]}, ...]}`, in the order the coordinator lists them.
public struct ModelLayout: Sendable, Equatable, Codable {
    public struct Entry: Sendable, Equatable, Codable {
        /// `"<layer>.weights"` or `"<layer>.bias"`.
        public let name: String
        public let shape: [Int]

        public init(name: String, shape: [Int]) {
            self.name = name
            self.shape = shape
        }

        /// The layer the tensor belongs to (the scope of its Core ML parameter key).
        public var layer: String { String(name[..<(name.lastIndex(of: ".") ?? name.endIndex)]) }

        /// Whether it is the layer's bias (else its weights).
        public var isBias: Bool { name.hasSuffix(".bias") }

        public var count: Int { shape.reduce(1, *) }
    }

    public let tensors: [Entry]

    /// Throws ``TensorError`` for a name that is not `<layer>.weights` / `<layer>.bias`, a
    /// repeated name, or a negative dimension.
    public init(tensors: [Entry]) throws {
        var seen = Set<String>()
        for entry in tensors {
            guard entry.name.hasSuffix(".weights") || entry.name.hasSuffix(".bias"),
                !entry.layer.isEmpty
            else {
                throw TensorError("layout: '\(entry.name)' is not <layer>.weights or <layer>.bias")
            }
            guard seen.insert(entry.name).inserted else {
                throw TensorError("layout: tensor \(entry.name) listed twice")
            }
            guard entry.shape.allSatisfy({ $0 >= 0 }) else {
                throw TensorError("layout: tensor \(entry.name) has shape \(entry.shape)")
            }
        }
        self.tensors = tensors
    }

    public init(from decoder: any Decoder) throws {
        struct Raw: Decodable { let tensors: [Entry] }
        try self.init(tensors: Raw(from: decoder).tensors)
    }

    /// A layout read from its JSON file.
    public init(contentsOf url: URL) throws {
        self = try JSONDecoder().decode(ModelLayout.self, from: Data(contentsOf: url))
    }

    /// The values a trainer read back for `entry` as a tensor of the declared shape.
    ///
    /// `reportedShape` is the shape the framework gave with them: the same rank must mean the
    /// same dimensions; a different rank is accepted only as another view of the same values
    /// (same count). Throws ``TensorError`` saying what does not match.
    public func tensor(_ entry: Entry, values: [Float], reportedShape: [Int]) throws
        -> NamedTensor
    {
        guard values.count == entry.count else {
            throw TensorError(
                "tensor \(entry.name): read back \(values.count) values, the model declares "
                    + "\(entry.shape) (\(entry.count))")
        }
        if reportedShape.count == entry.shape.count, reportedShape != entry.shape {
            throw TensorError(
                "tensor \(entry.name): read back shape \(reportedShape), the model declares "
                    + "\(entry.shape)")
        }
        return try NamedTensor(name: entry.name, shape: entry.shape, values: values)
    }
}
