import AsyncHTTPClient
import Foundation
import NIOCore
import WeChat

/// Builds and signs pushes the way WeChat's servers do, and delivers them to an
/// ingress with WeChat's 5-second timeout and up to 3 tries.
public struct Pusher: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        case plaintext, compatible, safe
    }

    public var ingressURL: String
    public var appID: String
    public var token: String
    public var crypto: WeChatMessageCrypto?
    public var accountID: String
    public var mode: Mode
    public var timeout: Duration = .seconds(5)
    public var tries: Int = 3

    public init(ingressURL: String, appID: String, token: String, aesKey: EncodingAESKey?, accountID: String = "gh_wechatrelay", mode: Mode) {
        self.ingressURL = ingressURL
        self.appID = appID
        self.token = token
        self.crypto = aesKey.map { WeChatMessageCrypto(appID: appID, key: $0) }
        self.accountID = accountID
        self.mode = mode
    }

    /// The outcome of one push.
    public struct Result: Sendable {
        public var status: Int
        public var body: String
        public var tries: Int
    }

    /// Signs and POSTs one message; retries on timeouts, connection errors and 5xx like WeChat.
    public func push(_ xml: String, openID: String, client: HTTPClient = .shared) async throws -> Result {
        let timestamp = String(Int(Date().timeIntervalSince1970))
        let nonce = String(UInt32.random(in: 100_000_000...999_999_999))
        var query = "signature=\(WeChatSignature.signature(token: token, timestamp: timestamp, nonce: nonce))&timestamp=\(timestamp)&nonce=\(nonce)&openid=\(openID)"
        var body = xml
        if mode != .plaintext {
            guard let crypto else { throw PushError(message: "\(mode) mode needs WECHAT_AES_KEY") }
            let encrypted = try crypto.encrypt(xml)
            query += "&encrypt_type=aes&msg_signature=\(WeChatSignature.messageSignature(token: token, timestamp: timestamp, nonce: nonce, encrypted: encrypted))"
            if mode == .safe {
                var x = XMLBuilder()
                x.cdata("ToUserName", accountID)
                x.cdata("Encrypt", encrypted)
                body = x.finish()
            } else {
                body = xml.replacingOccurrences(of: "</xml>", with: "<Encrypt><![CDATA[\(encrypted)]]></Encrypt></xml>")
            }
        }
        var lastError: (any Error)?
        for attempt in 1...tries {
            var request = HTTPClientRequest(url: "\(ingressURL)?\(query)")
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "text/xml")
            request.body = .bytes(ByteBuffer(string: body))
            do {
                let response = try await client.execute(request, timeout: .init(timeout))
                let text = String(buffer: try await response.body.collect(upTo: 1 << 20))
                if response.status.code >= 500, attempt < tries { continue }
                return Result(status: Int(response.status.code), body: text, tries: attempt)
            } catch {
                lastError = error
            }
        }
        throw PushError(message: "no answer from \(ingressURL) after \(tries) tries: \(lastError.map { "\($0)" } ?? "?")")
    }

    /// The passive reply in an ingress's answer to a push, as WeChat reads it: `nil` for
    /// `success` (or an empty answer); the reply's XML otherwise — decrypted, after its
    /// `MsgSignature` was checked, when it came encrypted (safe and compatible mode).
    /// - Throws: a ``PushError`` or ``WeChatError`` for an answer WeChat would refuse.
    public func passiveReply(in body: String) throws -> XMLElement? {
        guard !body.isEmpty, body != "success" else { return nil }
        let root = try WeChatXML.parse(body)
        guard let encrypted = root[child: "Encrypt"]?.text else { return root }
        guard let crypto else { throw PushError(message: "an encrypted passive reply, but no WECHAT_AES_KEY to read it") }
        try WeChatSignature.verifyMessageSignature(
            root[child: "MsgSignature"]?.text ?? "", token: token, timestamp: root[child: "TimeStamp"]?.text ?? "",
            nonce: root[child: "Nonce"]?.text ?? "", encrypted: encrypted)
        return try WeChatXML.parse(try crypto.decrypt(encrypted))
    }

    /// The URL-verification GET; returns whether `echostr` came back verbatim.
    public func verify(client: HTTPClient = .shared) async throws -> (status: Int, echoed: Bool) {
        let timestamp = String(Int(Date().timeIntervalSince1970))
        let nonce = String(UInt32.random(in: 100_000_000...999_999_999))
        let echostr = String(UInt64.random(in: 1...UInt64.max))
        let signature = WeChatSignature.signature(token: token, timestamp: timestamp, nonce: nonce)
        let request = HTTPClientRequest(url: "\(ingressURL)?signature=\(signature)&timestamp=\(timestamp)&nonce=\(nonce)&echostr=\(echostr)")
        let response = try await client.execute(request, timeout: .init(timeout))
        let text = String(buffer: try await response.body.collect(upTo: 1 << 16))
        return (Int(response.status.code), response.status.code == 200 && text == echostr)
    }
}

public struct PushError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// Builds the XML WeChat pushes for any message type or event.
public enum PushBuilder {
    /// - Parameters:
    ///   - kind: a message type (`text`, `image`, `voice`, `video`, `shortvideo`, `location`,
    ///     `link`, `file`) or `event`.
    ///   - value: the text of a text message, the Recognition of a voice message, or the event name.
    ///   - eventKey: EventKey for events (`HELP` for a CLICK, `qrscene_…` for a subscribe).
    public static func xml(
        kind: String, value: String?, eventKey: String?, from openID: String, to accountID: String,
        msgID: UInt64 = UInt64.random(in: 1_000_000_000...UInt64(Int64.max)), createTime: Int64 = Int64(Date().timeIntervalSince1970)
    ) throws -> String {
        var x = XMLBuilder()
        x.header(to: accountID, from: openID, createTime: createTime, msgType: kind)
        switch kind {
        case "text": x.cdata("Content", value ?? "")
        case "image": x.cdata("PicUrl", "http://mmbiz.qpic.cn/sim.jpg"); x.cdata("MediaId", "media_\(msgID)")
        case "voice":
            x.cdata("MediaId", "media_\(msgID)"); x.cdata("Format", "amr")
            if let value { x.cdata("Recognition", value) }
        case "video", "shortvideo": x.cdata("MediaId", "media_\(msgID)"); x.cdata("ThumbMediaId", "thumb_\(msgID)")
        case "location":
            x.raw("Location_X", "23.134521"); x.raw("Location_Y", "113.358803"); x.raw("Scale", "20"); x.cdata("Label", value ?? "广州")
        case "link": x.cdata("Title", value ?? "link"); x.cdata("Description", "sim"); x.cdata("Url", "https://example.com/")
        case "file": x.cdata("Title", value ?? "file.pdf"); x.cdata("FileKey", "key_\(msgID)"); x.cdata("FileMd5", "0"); x.raw("FileTotalLen", "1")
        case "event":
            guard let event = value, !event.isEmpty else { throw PushError(message: "an event needs a name (subscribe, CLICK, …)") }
            x.cdata("Event", event)
            if let eventKey { x.cdata("EventKey", eventKey) }
            return x.finish()
        default:
            throw PushError(message: "unknown message type '\(kind)'")
        }
        x.raw("MsgId", String(msgID))
        return x.finish()
    }
}
