// The proto3 JSON mapping for the message types in Messages.swift.
//
// https://protobuf.dev/programming-guides/json/: field names in lowerCamelCase (parsers also
// accept the original snake_case name), default values omitted, 64-bit integers as decimal
// strings, bytes as base64, float/double as numbers or "NaN" / "Infinity" / "-Infinity",
// a oneof as the one field that is present. This is what Python's
// google.protobuf.json_format and swift-protobuf's JSON coding read and write, so any
// transport can carry these types.
import Foundation

/// A proto3 field value: its default, and how it is written in the JSON mapping.
public protocol ProtoJSONValue: Sendable, Equatable {
    static var protoDefault: Self { get }
    init(protoJSON decoder: any Decoder) throws
    func encodeProtoJSON(to encoder: any Encoder) throws
}

/// A proto message: a struct whose every field has a default.
public protocol ProtoMessage: ProtoJSONValue, Codable {
    init()
}

extension ProtoMessage {
    public static var protoDefault: Self { Self() }
    public init(protoJSON decoder: any Decoder) throws { try self.init(from: decoder) }
    public func encodeProtoJSON(to encoder: any Encoder) throws { try encode(to: encoder) }

    /// The message in the proto3 JSON mapping.
    public func jsonData() throws -> Data { try JSONEncoder().encode(self) }

    /// A message read from the proto3 JSON mapping.
    public init(jsonData: Data) throws {
        self = try JSONDecoder().decode(Self.self, from: jsonData)
    }
}

/// A JSON object key: a field's JSON name or its proto name.
public struct ProtoKey: CodingKey, Hashable, Sendable {
    public var stringValue: String
    public var intValue: Int? { nil }
    public init(_ name: String) { stringValue = name }
    public init?(stringValue: String) { self.stringValue = stringValue }
    public init?(intValue: Int) { nil }
}

/// Decodes a ``ProtoJSONValue`` through Decodable.
struct ProtoBox<Value: ProtoJSONValue>: Codable {
    var value: Value
    init(_ value: Value) { self.value = value }
    init(from decoder: any Decoder) throws { value = try Value(protoJSON: decoder) }
    func encode(to encoder: any Encoder) throws { try value.encodeProtoJSON(to: encoder) }
}

extension KeyedDecodingContainer where Key == ProtoKey {
    /// The field `json` (or its proto name `proto`), its default when absent or null.
    public func field<Value: ProtoJSONValue>(_ json: String, _ proto: String? = nil) throws
        -> Value
    {
        for name in [json, proto].compactMap({ $0 }) {
            let key = ProtoKey(name)
            if contains(key), try !decodeNil(forKey: key) {
                return try decode(ProtoBox<Value>.self, forKey: key).value
            }
        }
        return Value.protoDefault
    }

    /// Whether the field is present (and not null): the test for a oneof member.
    public func has(_ json: String, _ proto: String? = nil) throws -> Bool {
        for name in [json, proto].compactMap({ $0 }) {
            let key = ProtoKey(name)
            if contains(key), try !decodeNil(forKey: key) { return true }
        }
        return false
    }
}

extension KeyedEncodingContainer where Key == ProtoKey {
    /// Writes the field unless it holds its default (proto3 omits defaults).
    public mutating func field<Value: ProtoJSONValue>(_ value: Value, _ json: String) throws {
        if value != Value.protoDefault {
            try encode(ProtoBox(value), forKey: ProtoKey(json))
        }
    }

    /// Writes a oneof member, even when it holds only defaults: its presence is the choice.
    public mutating func member<Value: ProtoMessage>(_ value: Value, _ json: String) throws {
        try encode(ProtoBox(value), forKey: ProtoKey(json))
    }
}

/// The error for a JSON value the proto3 mapping does not allow.
func protoJSONError(_ decoder: any Decoder, _ message: String) -> DecodingError {
    .dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: message))
}

extension String: ProtoJSONValue {
    public static var protoDefault: String { "" }
    public init(protoJSON decoder: any Decoder) throws {
        self = try decoder.singleValueContainer().decode(String.self)
    }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(self)
    }
}

extension Bool: ProtoJSONValue {
    public static var protoDefault: Bool { false }
    public init(protoJSON decoder: any Decoder) throws {
        self = try decoder.singleValueContainer().decode(Bool.self)
    }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(self)
    }
}

/// Integers: a JSON number or a decimal string (both are valid for every integer type).
private func decodeInteger<T: FixedWidthInteger & Decodable>(_ decoder: any Decoder) throws -> T {
    let container = try decoder.singleValueContainer()
    if let text = try? container.decode(String.self) {
        guard let value = T(text) else {
            throw protoJSONError(decoder, "'\(text)' is not a \(T.self)")
        }
        return value
    }
    return try container.decode(T.self)
}

extension UInt32: ProtoJSONValue {
    public static var protoDefault: UInt32 { 0 }
    public init(protoJSON decoder: any Decoder) throws { self = try decodeInteger(decoder) }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(self)
    }
}

extension UInt64: ProtoJSONValue {
    public static var protoDefault: UInt64 { 0 }
    public init(protoJSON decoder: any Decoder) throws { self = try decodeInteger(decoder) }
    /// 64-bit integers are strings: JavaScript numbers lose precision past 2^53.
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(String(self))
    }
}

/// Floating point: a number, or one of the strings the mapping uses for non-finite values.
private func decodeFloatingPoint<T: BinaryFloatingPoint & LosslessStringConvertible & Decodable>(
    _ decoder: any Decoder
) throws -> T {
    let container = try decoder.singleValueContainer()
    if let text = try? container.decode(String.self) {
        switch text {
        case "NaN": return .nan
        case "Infinity": return .infinity
        case "-Infinity": return -.infinity
        default:
            guard let value = T(text) else {
                throw protoJSONError(decoder, "'\(text)' is not a number")
            }
            return value
        }
    }
    return try container.decode(T.self)
}

private func encodeFloatingPoint<T: BinaryFloatingPoint & Encodable>(
    _ value: T, _ encoder: any Encoder
) throws {
    var container = encoder.singleValueContainer()
    if value.isNaN {
        try container.encode("NaN")
    } else if value.isInfinite {
        try container.encode(value > 0 ? "Infinity" : "-Infinity")
    } else {
        try container.encode(value)
    }
}

extension Float: ProtoJSONValue {
    public static var protoDefault: Float { 0 }
    public init(protoJSON decoder: any Decoder) throws { self = try decodeFloatingPoint(decoder) }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        try encodeFloatingPoint(self, encoder)
    }
}

extension Double: ProtoJSONValue {
    public static var protoDefault: Double { 0 }
    public init(protoJSON decoder: any Decoder) throws { self = try decodeFloatingPoint(decoder) }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        try encodeFloatingPoint(self, encoder)
    }
}

extension Data: ProtoJSONValue {
    public static var protoDefault: Data { Data() }
    /// Base64, standard or URL-safe, with or without padding (the mapping accepts all four).
    public init(protoJSON decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        var standard = text.replacingOccurrences(of: "-", with: "+")
            .replacingOccurrences(of: "_", with: "/")
        standard += String(repeating: "=", count: (4 - standard.utf8.count % 4) % 4)
        guard let data = Data(base64Encoded: standard) else {
            throw protoJSONError(decoder, "bytes field is not base64")
        }
        self = data
    }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(base64EncodedString())
    }
}

extension Array: ProtoJSONValue where Element: ProtoJSONValue {
    public static var protoDefault: [Element] { [] }
    public init(protoJSON decoder: any Decoder) throws {
        var container = try decoder.unkeyedContainer()
        var values: [Element] = []
        while !container.isAtEnd {
            values.append(try container.decode(ProtoBox<Element>.self).value)
        }
        self = values
    }
    public func encodeProtoJSON(to encoder: any Encoder) throws {
        var container = encoder.unkeyedContainer()
        for value in self { try container.encode(ProtoBox(value)) }
    }
}
