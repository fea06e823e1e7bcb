import AMQP
import RelayCore
import WeChat
import RelayContract

/// The ingress's settings, from the variables of docs/CONTRACT.md.
public struct IngressConfiguration: Sendable {
    public var appID: String
    /// Tokens accepted for signatures: the current one, then the previous one during a rotation.
    public var tokens: [String]
    /// Set when `WECHAT_AES_KEY` is: enables compatible and safe modes (with the previous key for rotation).
    public var crypto: WeChatMessageCrypto?
    /// When set, a message whose `ToUserName` differs is rejected.
    public var accountID: String?
    public var amqp: AMQPConfiguration
    public var host: String
    public var port: Int
    /// Seconds a request's timestamp may differ from now; 0 disables the check.
    public var timestampWindow: Int64
    public var maxBody: Int
    public var confirmTimeout: Duration
    public var topology: WeChatTopology
    /// The console's message mode (`WECHAT_ENCRYPTION`): in ``Encryption/safe`` a push without
    /// a valid `msg_signature` and `Encrypt` is refused.
    public var encryption: Encryption
    /// How long a connection may stay idle (or send nothing of a request) before it is closed (`HTTP_IDLE_TIMEOUT`).
    public var idleTimeout: Duration
    /// How long a push waits, after the confirm, for a passive reply decided by a worker
    /// (`INGRESS_REPLY_WAIT`); zero answers `success` at once.
    public var replyWait: Duration
    /// How long after a push's arrival offers are taken: `INGRESS_REPLY_WAIT`, but at most 4.5 s,
    /// since WeChat drops an answer later than its 5 s (counted from before the push arrives).
    /// A longer wait (passive-only) holds the request without taking offers, so that WeChat gives
    /// up on it and pushes again, and the retry's ingress waits for the reply.
    public var offerWindow: Duration { min(replyWait, Self.latestUsefulAnswer) }
    /// WeChat's 5 s, less a margin for the network and its own clock.
    public static let latestUsefulAnswer: Duration = .milliseconds(4_500)

    /// The three message modes of WeChat's console (明文, 兼容, 安全).
    public enum Encryption: String, Sendable, CaseIterable {
        /// Plaintext pushes; encrypted ones are still decrypted when a key is configured.
        case plaintext
        /// WeChat sends both; either is accepted.
        case compatible
        /// Only encrypted pushes with a valid `msg_signature` are accepted: the URL signature
        /// does not cover the body, so a plaintext push could be forged by anyone who saw a signed URL.
        case safe
    }

    /// - Throws: ``ConfigurationError`` naming the variable.
    public init(_ env: RelayEnvironment) throws {
        let appID = try env.required("WECHAT_APPID")
        self.appID = appID
        let token = try env.required("WECHAT_TOKEN", isSecret: true)
        tokens = [token] + (env.string("WECHAT_PREVIOUS_TOKEN", isSecret: true).map { [$0] } ?? [])
        func aesKey(_ variable: String) throws -> EncodingAESKey? {
            guard let text = env.string(variable, isSecret: true) else { return nil }
            do {
                return try EncodingAESKey(text)
            } catch let e as WeChatError {
                throw ConfigurationError(variable: variable, reason: e.message)
            }
        }
        let key = try aesKey("WECHAT_AES_KEY")
        let previous = try aesKey("WECHAT_PREVIOUS_AES_KEY")
        if previous != nil, key == nil {
            throw ConfigurationError(variable: "WECHAT_PREVIOUS_AES_KEY", reason: "is set but WECHAT_AES_KEY is not")
        }
        crypto = key.map { WeChatMessageCrypto(appID: appID, key: $0, previousKey: previous) }
        accountID = env.string("WECHAT_ACCOUNT_ID")
        let url = env.string("AMQP_URL", isSecret: true) ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
        do {
            amqp = try AMQPConfiguration(url: url, connectionName: "wechat-ingress")
        } catch let e as AMQPError {
            throw ConfigurationError(variable: "AMQP_URL", reason: e.message)
        }
        host = env.string("HTTP_HOST") ?? "0.0.0.0"
        port = try env.port("HTTP_PORT", default: 8080)
        timestampWindow = Int64(try env.int("INGRESS_TIMESTAMP_WINDOW", default: 300))
        maxBody = try env.int("INGRESS_MAX_BODY", default: 65536, range: 64...(64 << 20))
        confirmTimeout = .seconds(try env.int("INGRESS_CONFIRM_TIMEOUT", default: 4, range: 1...60))
        // Not in the contract: lets several deployments (or tests) share one broker and Redis.
        topology = WeChatTopology(prefix: env.string("WECHAT_QUEUE_PREFIX") ?? "wechat")
        if let text = env.string("WECHAT_ENCRYPTION") {
            guard let e = Encryption(rawValue: text.lowercased()) else {
                throw ConfigurationError(variable: "WECHAT_ENCRYPTION", reason: "must be plaintext, compatible or safe")
            }
            if e != .plaintext, key == nil {
                throw ConfigurationError(variable: "WECHAT_ENCRYPTION", reason: "\(e.rawValue) mode needs WECHAT_AES_KEY")
            }
            encryption = e
        } else {
            encryption = key == nil ? .plaintext : .compatible
        }
        idleTimeout = .seconds(try env.int("HTTP_IDLE_TIMEOUT", default: 30, range: 1...3600))
        replyWait = try Self.replyWait(env.string("INGRESS_REPLY_WAIT"))
    }

    /// `INGRESS_REPLY_WAIT`: seconds, with up to three decimals, 0 to 15 (WeChat gives a push
    /// 5 s and retries twice, so no answer is useful later than that).
    static func replyWait(_ text: String?) throws -> Duration {
        guard let text, !text.isEmpty else { return .zero }
        let parts = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let whole = Int(parts[0]), (0...15).contains(whole), parts[0].allSatisfy({ $0.isASCII && $0.isNumber }),
            parts.count == 1 || (1...3).contains(parts[1].count) && parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
            let fraction = parts.count == 2 ? Int(parts[1].padding(toLength: 3, withPad: "0", startingAt: 0)) : 0,
            whole < 15 || fraction == 0
        else {
            throw ConfigurationError(variable: "INGRESS_REPLY_WAIT", reason: "must be seconds from 0 to 15 (up to 3 decimals), not '\(text)'")
        }
        return .seconds(whole) + .milliseconds(fraction)
    }
}
