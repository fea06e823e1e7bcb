import ArgumentParser
import WeChat

/// Prints `QUERY BODY` for one signed ~300-byte text push (for `ops/bench ingress`).
struct SignPush: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "sign-push")
    @Option var token: String
    @Option var appid: String
    @Option(help: "EncodingAESKey: sign a safe-mode push instead of plaintext.") var aesKey: String?
    @Option var timestamp: String = "1700000000"
    @Option var nonce: String = "1234567890"

    func run() throws {
        let xml = ProtocolBench.plain
        let signature = WeChatSignature.signature(token: token, timestamp: timestamp, nonce: nonce)
        var query = "signature=\(signature)&timestamp=\(timestamp)&nonce=\(nonce)&openid=oABCD1234567890abcdefghijkl"
        var body = xml
        if let aesKey {
            let crypto = WeChatMessageCrypto(appID: appid, key: try EncodingAESKey(aesKey))
            let encrypted = try crypto.encrypt(xml)
            let msgSignature = WeChatSignature.messageSignature(token: token, timestamp: timestamp, nonce: nonce, encrypted: encrypted)
            query += "&encrypt_type=aes&msg_signature=\(msgSignature)"
            var x = XMLBuilder()
            x.cdata("ToUserName", "gh_1234567890ab")
            x.cdata("Encrypt", encrypted)
            body = x.finish()
        }
        print("\(query) \(body)")
    }
}
