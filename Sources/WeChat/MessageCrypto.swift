import Crypto
import Foundation
import _CryptoExtras

/// An EncodingAESKey: 43 characters of Base64 (without the trailing `=`) that decode to the 32-byte AES key.
public struct EncodingAESKey: Sendable, Equatable {
    /// The 32 key bytes; the first 16 are also the CBC IV.
    public let bytes: [UInt8]

    /// The CBC IV: the key's first 16 bytes.
    let iv: AES._CBC.IV

    public static func == (a: EncodingAESKey, b: EncodingAESKey) -> Bool { a.bytes == b.bytes }

    /// - Throws: ``WeChatError/Code/illegalAESKey`` saying what is wrong (never echoing the key).
    public init(_ text: String) throws {
        guard text.utf8.count == 43 else {
            throw WeChatError(.illegalAESKey, "EncodingAESKey must be 43 characters, got \(text.utf8.count)")
        }
        guard let data = Data(base64Encoded: text + "="), data.count == 32 else {
            throw WeChatError(.illegalAESKey, "EncodingAESKey is not valid Base64")
        }
        bytes = Array(data)
        iv = try AES._CBC.IV(ivBytes: bytes[0..<16])
    }
}

/// Safe-mode message encryption, compatible with WeChat's official library (protocol page §3).
///
/// Frame: `random(16) ‖ length (4 bytes, big-endian) ‖ message (UTF-8) ‖ appid`, PKCS#7-padded
/// to a multiple of 32 bytes, AES-256-CBC with IV = key[0..<16], Base64.
/// During a key rotation, decryption tries the current key, then the previous one.
public struct WeChatMessageCrypto: Sendable {
    public let appID: String
    private let keys: [Key]

    private struct Key: Sendable {
        let symmetric: SymmetricKey
        let iv: AES._CBC.IV
    }

    /// - Parameters:
    ///   - key: the current EncodingAESKey.
    ///   - previousKey: the key before a rotation, still accepted for decryption.
    public init(appID: String, key: EncodingAESKey, previousKey: EncodingAESKey? = nil) {
        self.appID = appID
        self.keys = ([key] + (previousKey.map { [$0] } ?? [])).map { k in
            Key(symmetric: SymmetricKey(data: k.bytes), iv: k.iv)
        }
    }

    /// Encrypts a message (normally reply XML) to the Base64 `Encrypt` text.
    /// - Parameter random: the 16 random bytes at the start of the frame; fresh random bytes
    ///   when `nil` (pass fixed bytes to reproduce test vectors).
    /// - Parameter keyIndex: 0 for the current key, 1 for the previous one (a reply to a push
    ///   that came under the previous key, during a rotation; see ``decryptReportingKey(_:)``).
    public func encrypt(_ message: String, random: [UInt8]? = nil, keyIndex: Int = 0) throws -> String {
        guard keys.indices.contains(keyIndex) else { throw WeChatError(.encryptAES, "no key number \(keyIndex)") }
        let key = keys[keyIndex]
        let prefix = random ?? (0..<16).map { _ in UInt8.random(in: 0...255) }
        guard prefix.count == 16 else { throw WeChatError(.encryptAES, "the random prefix must be 16 bytes") }
        let msg = Array(message.utf8)
        let appid = Array(appID.utf8)
        var frame = prefix
        frame.reserveCapacity(16 + 4 + msg.count + appid.count + 32)
        let n = UInt32(msg.count)
        frame += [UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)]
        frame += msg
        frame += appid
        let pad = 32 - frame.count % 32
        frame += [UInt8](repeating: UInt8(pad), count: pad)
        do {
            let cipher = try AES._CBC.encrypt(frame, using: key.symmetric, iv: key.iv, noPadding: true)
            return cipher.base64EncodedString()
        } catch {
            throw WeChatError(.encryptAES, "AES encryption failed")
        }
    }

    /// Decrypts the Base64 `Encrypt` text to the message, checking padding, length and appid.
    ///
    /// Tries the current key first, then the previous one; if both fail, throws the current key's error.
    /// - Throws: ``WeChatError`` with `decodeBase64`, `decryptAES`, `invalidPadding`,
    ///   `illegalBuffer` or `validateAppID`.
    public func decrypt(_ encrypted: String) throws -> String { try decryptReportingKey(encrypted).message }

    /// As ``decrypt(_:)``, and which key opened it: 0 the current, 1 the previous.
    public func decryptReportingKey(_ encrypted: String) throws -> (message: String, keyIndex: Int) {
        guard let data = Data(base64Encoded: encrypted) else {
            throw WeChatError(.decodeBase64, "Encrypt is not valid Base64")
        }
        guard !data.isEmpty, data.count % 16 == 0 else {
            throw WeChatError(.decryptAES, "ciphertext of \(data.count) bytes is not a whole number of AES blocks")
        }
        var firstError: WeChatError?
        for (i, key) in keys.enumerated() {
            do {
                return (try open(data, key), i)
            } catch let e as WeChatError {
                if firstError == nil { firstError = e }
            }
        }
        throw firstError ?? WeChatError(.decryptAES, "no key")
    }

    private func open(_ data: Data, _ key: Key) throws -> String {
        let plain: [UInt8]
        do {
            plain = Array(try AES._CBC.decrypt(data, using: key.symmetric, iv: key.iv, noPadding: true))
        } catch {
            throw WeChatError(.decryptAES, "AES decryption failed")
        }
        guard let last = plain.last, (1...32).contains(last), Int(last) <= plain.count,
            plain[(plain.count - Int(last))...].allSatisfy({ $0 == last })
        else {
            throw WeChatError(.invalidPadding, "PKCS#7 padding is invalid (wrong EncodingAESKey?)")
        }
        let content = plain.count - Int(last)
        guard content >= 20 else { throw WeChatError(.illegalBuffer, "decrypted frame is too short") }
        let length = Int(plain[16]) << 24 | Int(plain[17]) << 16 | Int(plain[18]) << 8 | Int(plain[19])
        guard 20 + length <= content else {
            throw WeChatError(.illegalBuffer, "length field \(length) exceeds the decrypted frame")
        }
        let appid = plain[(20 + length)..<content]
        guard appid.elementsEqual(appID.utf8) else {
            throw WeChatError(.validateAppID, "the message is for another appid")
        }
        guard let message = String(validating: plain[20..<(20 + length)], as: UTF8.self) else {
            throw WeChatError(.illegalBuffer, "decrypted message is not UTF-8")
        }
        return message
    }

    /// Builds the passive encrypted reply envelope: `<xml><Encrypt/><MsgSignature/><TimeStamp/><Nonce/></xml>`.
    public func encryptedReply(
        _ replyXML: String, token: String, timestamp: String, nonce: String, random: [UInt8]? = nil, keyIndex: Int = 0
    ) throws -> String {
        let encrypted = try encrypt(replyXML, random: random, keyIndex: keyIndex)
        let signature = WeChatSignature.messageSignature(
            token: token, timestamp: timestamp, nonce: nonce, encrypted: encrypted)
        var xml = XMLBuilder()
        xml.cdata("Encrypt", encrypted)
        xml.cdata("MsgSignature", signature)
        xml.raw("TimeStamp", timestamp)
        xml.cdata("Nonce", nonce)
        return xml.finish()
    }
}
