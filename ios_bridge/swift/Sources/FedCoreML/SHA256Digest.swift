// SHA-256 of a downloaded model, fed chunk by chunk: CryptoKit on Apple platforms, OpenSSL's
// libcrypto (EVP API, https://docs.openssl.org/3.0/man3/EVP_DigestInit/) elsewhere.
import Foundation

#if canImport(CryptoKit)
    import CryptoKit
#else
    import CLibcrypto
#endif

/// An incremental SHA-256: `update` with each piece in order, then `hexDigest` once.
public struct SHA256Digest: ~Copyable {
    #if canImport(CryptoKit)
        private var hasher = CryptoKit.SHA256()
    #else
        private let context: OpaquePointer
    #endif

    public init() {
        #if !canImport(CryptoKit)
            guard let context = EVP_MD_CTX_new(), EVP_DigestInit_ex(context, EVP_sha256(), nil) == 1
            else { fatalError("libcrypto could not start a SHA-256 digest (out of memory?)") }
            self.context = context
        #endif
    }

    deinit {
        #if !canImport(CryptoKit)
            EVP_MD_CTX_free(context)
        #endif
    }

    public mutating func update(_ data: Data) {
        #if canImport(CryptoKit)
            hasher.update(data: data)
        #else
            data.withUnsafeBytes { raw in
                let ok = EVP_DigestUpdate(context, raw.baseAddress, raw.count)
                precondition(ok == 1, "EVP_DigestUpdate failed")
            }
        #endif
    }

    /// The digest of everything passed to `update`, as lowercase hex.
    public consuming func hexDigest() -> String {
        #if canImport(CryptoKit)
            let bytes = Array(hasher.finalize())
        #else
            var bytes = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
            var length: UInt32 = 0
            let ok = EVP_DigestFinal_ex(context, &bytes, &length)
            precondition(ok == 1, "EVP_DigestFinal_ex failed")
            bytes = Array(bytes.prefix(Int(length)))
        #endif
        let hex = Array("0123456789abcdef".utf8)
        return String(
            decoding: bytes.flatMap { [hex[Int($0 >> 4)], hex[Int($0 & 15)]] }, as: UTF8.self)
    }

    /// The hex SHA-256 of `data`.
    public static func hex(of data: Data) -> String {
        var digest = SHA256Digest()
        digest.update(data)
        return digest.hexDigest()
    }
}
