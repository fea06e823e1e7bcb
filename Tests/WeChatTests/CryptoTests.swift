import Crypto
import Foundation
import Testing
import WeChat
import _CryptoExtras

@Suite("Safe-mode crypto")
struct CryptoTests {
    let crypto = WeChatMessageCrypto(appID: SafeModeVector.appID, key: try! EncodingAESKey(SafeModeVector.key))

    @Test func inboundVectorDecrypts() throws {
        let xml = try crypto.decrypt(SafeModeVector.encrypt)
        #expect(xml.utf8.count == 293)
        let message = try InboundMessage(xml: xml)
        #expect(message.kind == .text(content: "hello"))
        #expect(message.msgID == "12345")
        // The random prefix, checked with a raw AES decryption.
        let key = try EncodingAESKey(SafeModeVector.key).bytes
        let raw = try AES._CBC.decrypt(
            Data(base64Encoded: SafeModeVector.encrypt)!, using: SymmetricKey(data: key),
            iv: AES._CBC.IV(ivBytes: key[0..<16]), noPadding: true)
        #expect(String(decoding: raw.prefix(16), as: UTF8.self) == "d43123b161a4ba84")
    }

    @Test func deterministicEncryptVector() throws {
        let out = try crypto.encrypt("我是中文abcd123", random: Array("aaaabbbbccccdddd".utf8))
        #expect(out == "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg==")
        #expect(try crypto.decrypt(out) == "我是中文abcd123")
    }

    @Test(arguments: Array(0...130))
    func roundTripAroundPaddingBoundaries(size: Int) throws {
        // 16 + 4 + appid(18) = 38 bytes of frame overhead: sizes 26, 58, 90, 122 land exactly on 32.
        var rng = SystemRandomNumberGenerator()
        let alphabet = Array("ab中文🎉<]]>&\n")
        var s = ""
        while s.utf8.count < size { s.append(alphabet[Int(rng.next() % UInt64(alphabet.count))]) }
        let encrypted = try crypto.encrypt(s)
        #expect(Data(base64Encoded: encrypted)!.count % 32 == 0)
        #expect(try crypto.decrypt(encrypted) == s)
    }

    @Test func randomPayloadsRoundTrip() throws {
        for _ in 0..<300 {
            let n = Int.random(in: 0...3000)
            let scalars = (0..<n).map { _ -> Character in
                let pick = Int.random(in: 0..<4)
                switch pick {
                case 0: return Character(Unicode.Scalar(UInt8.random(in: 0x20...0x7e)))
                case 1: return Character(Unicode.Scalar(UInt32.random(in: 0x4e00...0x9fff))!)
                case 2: return Character(Unicode.Scalar(UInt32.random(in: 0x1f600...0x1f64f))!)
                default: return "\n"
                }
            }
            let s = String(scalars)
            let random = (0..<16).map { _ in UInt8.random(in: 0...255) }
            let encrypted = try crypto.encrypt(s, random: random)
            #expect(try crypto.decrypt(encrypted) == s)
            // Same randomness, same ciphertext.
            #expect(try crypto.encrypt(s, random: random) == encrypted)
        }
    }

    @Test func wrongAppIDIsRejected() throws {
        let other = WeChatMessageCrypto(appID: "wx0000000000000000", key: try EncodingAESKey(SafeModeVector.key))
        #expect { try other.decrypt(SafeModeVector.encrypt) } throws: { ($0 as? WeChatError)?.code == .validateAppID }
    }

    @Test func wrongKeyIsRejected() throws {
        let other = WeChatMessageCrypto(
            appID: SafeModeVector.appID, key: try EncodingAESKey("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"))
        #expect {
            try other.decrypt(SafeModeVector.encrypt)
        } throws: { [.invalidPadding, .illegalBuffer, .validateAppID].contains(($0 as? WeChatError)?.code) }
    }

    @Test func badPaddingIsRejected() throws {
        // A correct frame with a padding byte of 33, encrypted with the right key.
        let key = try EncodingAESKey(SafeModeVector.key).bytes
        var frame = [UInt8](repeating: 0x41, count: 16) + [0, 0, 0, 2] + Array("hi".utf8) + Array(SafeModeVector.appID.utf8)
        frame += [UInt8](repeating: 33, count: 64 - frame.count)
        let cipher = try AES._CBC.encrypt(
            frame, using: SymmetricKey(data: key), iv: AES._CBC.IV(ivBytes: key[0..<16]), noPadding: true)
        #expect { try crypto.decrypt(cipher.base64EncodedString()) } throws: {
            ($0 as? WeChatError)?.code == .invalidPadding
        }
    }

    @Test func badLengthFieldIsRejected() throws {
        let key = try EncodingAESKey(SafeModeVector.key).bytes
        var frame = [UInt8](repeating: 0x41, count: 16) + [0, 0, 1, 0] + Array("hi".utf8) + Array(SafeModeVector.appID.utf8)
        let pad = 32 - frame.count % 32
        frame += [UInt8](repeating: UInt8(pad), count: pad)
        let cipher = try AES._CBC.encrypt(
            frame, using: SymmetricKey(data: key), iv: AES._CBC.IV(ivBytes: key[0..<16]), noPadding: true)
        #expect { try crypto.decrypt(cipher.base64EncodedString()) } throws: {
            ($0 as? WeChatError)?.code == .illegalBuffer
        }
    }

    @Test func truncatedBase64IsRejected() {
        // Not valid Base64 any more.
        #expect { try crypto.decrypt(String(SafeModeVector.encrypt.dropLast(3))) } throws: {
            ($0 as? WeChatError)?.code == .decodeBase64
        }
        #expect { try crypto.decrypt("not base64 at all!") } throws: { ($0 as? WeChatError)?.code == .decodeBase64 }
        // Valid Base64 that is not a whole number of AES blocks.
        #expect { try crypto.decrypt(String(SafeModeVector.encrypt.prefix(100))) } throws: {
            ($0 as? WeChatError)?.code == .decryptAES
        }
        #expect { try crypto.decrypt("") } throws: { ($0 as? WeChatError)?.code == .decryptAES }
    }

    @Test func tamperedCiphertextFailsTheMessageSignature() {
        var bytes = Array(SafeModeVector.encrypt.utf8)
        bytes[40] = bytes[40] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        let tampered = String(decoding: bytes, as: UTF8.self)
        #expect {
            try WeChatSignature.verifyMessageSignature(
                SafeModeVector.msgSignature, token: SafeModeVector.token, timestamp: SafeModeVector.timestamp,
                nonce: SafeModeVector.nonce, encrypted: tampered)
        } throws: { ($0 as? WeChatError)?.code == .validateSignature }
    }

    @Test func keyRotationAcceptsThePreviousKey() throws {
        let old = try EncodingAESKey(SafeModeVector.key)
        let new = try EncodingAESKey("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq")
        let rotated = WeChatMessageCrypto(appID: SafeModeVector.appID, key: new, previousKey: old)
        // Still decrypts what was encrypted with the old key…
        #expect(try rotated.decrypt(SafeModeVector.encrypt).contains("hello"))
        // …and encrypts with the new one.
        let fresh = try rotated.encrypt("x")
        #expect(try WeChatMessageCrypto(appID: SafeModeVector.appID, key: new).decrypt(fresh) == "x")
        #expect(throws: WeChatError.self) { try crypto.decrypt(fresh) }
    }

    @Test(arguments: ["", "abc", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
        "abcdefghijklmnopqrstuvwxyz0123456789ABCDE!G"])
    func illegalAESKeys(text: String) {
        #expect { try EncodingAESKey(text) } throws: { ($0 as? WeChatError)?.code == .illegalAESKey }
    }

    @Test func encryptedReplyEnvelope() throws {
        let reply = try crypto.encryptedReply(
            "<xml><Content><![CDATA[hi]]></Content></xml>", token: SafeModeVector.token, timestamp: "1409304348",
            nonce: "xxxxxx")
        let root = try WeChatXML.parse(reply)
        let encrypted = try #require(root[child: "Encrypt"]?.text)
        #expect(root[child: "TimeStamp"]?.text == "1409304348")
        #expect(root[child: "Nonce"]?.text == "xxxxxx")
        try WeChatSignature.verifyMessageSignature(
            root[child: "MsgSignature"]?.text ?? "", token: SafeModeVector.token, timestamp: "1409304348",
            nonce: "xxxxxx", encrypted: encrypted)
        #expect(try crypto.decrypt(encrypted) == "<xml><Content><![CDATA[hi]]></Content></xml>")
    }
}
