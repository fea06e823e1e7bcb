import Foundation
import TestSupport
import Testing
import WeChat

/// Our safe-mode crypto against wechatpy (PyPI), an independent implementation.
/// `ops/test` installs wechatpy into a virtualenv and sets `WECHATPY_PYTHON`.
@Suite("Interoperability with wechatpy", .enabled(if: TestServices.environment["WECHATPY_PYTHON"] != nil || TestServices.isCI))
struct InteropTests {
    static let script = """
        import sys
        from wechatpy.crypto import WeChatCrypto
        mode, token, key, appid = sys.argv[1:5]
        crypto = WeChatCrypto(token, key, appid)
        if mode == "encrypt":
            xml, nonce, timestamp = sys.argv[5:8]
            sys.stdout.write(crypto.encrypt_message(xml, nonce, timestamp))
        else:
            envelope, signature, timestamp, nonce = sys.argv[5:9]
            sys.stdout.write(crypto.decrypt_message(envelope, signature, timestamp, nonce))
        """

    func python(_ args: [String]) async throws -> String {
        guard let python = TestServices.environment["WECHATPY_PYTHON"] else { throw MissingService(variable: "WECHATPY_PYTHON") }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("wechatpy-interop-\(UUID().uuidString).py").path
        try Self.script.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        return try await runCommand(python, [path] + args)
    }

    static func randomKey() -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
        // The 43rd character carries 2 spare bits; "A" keeps them zero so the key is canonical.
        return String((0..<42).map { _ in alphabet.randomElement() ?? "A" }) + "A"
    }

    static let keys = [SafeModeVector.key, randomKey(), randomKey()]

    @Test(arguments: keys)
    func weDecryptWhatWechatpyEncrypts(key: String) async throws {
        let plain = pushXML([("ToUserName", "gh_x"), ("FromUserName", "oUser"), ("CreateTime", "1700000000"), ("MsgType", "text"),
            ("Content", "你好 wechatpy ]]> & <"), ("MsgId", "99")])
        let envelope = try await python(["encrypt", "tok123", key, "wx1234567890abcdef", plain, "nonce42", "1700000000"])
        let root = try WeChatXML.parse(envelope)
        let encrypted = try #require(root[child: "Encrypt"]?.text)
        try WeChatSignature.verifyMessageSignature(
            root[child: "MsgSignature"]?.text ?? "", token: "tok123", timestamp: "1700000000", nonce: "nonce42",
            encrypted: encrypted)
        let crypto = WeChatMessageCrypto(appID: "wx1234567890abcdef", key: try EncodingAESKey(key))
        #expect(try crypto.decrypt(encrypted) == plain)
    }

    @Test(arguments: keys)
    func wechatpyDecryptsOurReplies(key: String) async throws {
        let crypto = WeChatMessageCrypto(appID: "wx1234567890abcdef", key: try EncodingAESKey(key))
        for text in ["短", String(repeating: "回复 reply 🎉 ", count: 40), "x"] {
            let reply = PassiveReply(toUserName: "oUser", fromUserName: "gh_x", createTime: 1_700_000_001, content: .text(text)).xml
            let envelope = try crypto.encryptedReply(reply, token: "tok123", timestamp: "1700000001", nonce: "n1")
            let signature = try #require(try WeChatXML.parse(envelope)[child: "MsgSignature"]?.text)
            let decrypted = try await python(["decrypt", "tok123", key, "wx1234567890abcdef", envelope, signature, "1700000001", "n1"])
            #expect(decrypted == reply)
        }
    }
}
