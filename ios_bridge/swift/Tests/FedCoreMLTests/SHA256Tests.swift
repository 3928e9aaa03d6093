// SHA-256 (CryptoKit or libcrypto) against the FIPS 180-2 test vectors.
import FedCoreML
import Foundation
import Testing

@Suite struct SHA256Tests {
    @Test func knownVectors() {
        #expect(
            SHA256Digest.hex(of: Data())
                == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(
            SHA256Digest.hex(of: Data("abc".utf8))
                == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func incrementalEqualsWhole() {
        // One million "a", fed in uneven pieces as a resumed download would be.
        var digest = SHA256Digest()
        let piece = Data(repeating: UInt8(ascii: "a"), count: 99_999)
        for _ in 0..<10 { digest.update(piece) }
        digest.update(Data(repeating: UInt8(ascii: "a"), count: 10))
        #expect(
            digest.hexDigest()
                == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }
}
