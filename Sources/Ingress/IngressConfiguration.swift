import AMQP
import RelayCore
import WeChat
import RelayContract

/// The ingress's settings, from the variables of docs/CONTRACT.md.
public struct IngressConfiguration: Sendable {
    /// The accounts served at start (`/wechat/<appid>` each; `/wechat` when there is one);
    /// ``IngressHandler/reload(_:)`` replaces them.
    public var accounts: [IngressAccount]
    /// `WECHAT_ACCOUNTS_FILE`, watched for changes (and re-read on SIGHUP).
    public var accountsFile: String?
    /// The first account's mode (the single-account case).
    public var encryption: Encryption { accounts[0].encryption }
    public var amqp: AMQPConfiguration
    public var host: String
    public var port: Int
    /// Seconds a request's timestamp may differ from now; 0 disables the check.
    public var timestampWindow: Int64
    public var maxBody: Int
    public var confirmTimeout: Duration
    public var topology: WeChatTopology
    /// How long a connection may stay idle (or send nothing of a request) before it is closed (`HTTP_IDLE_TIMEOUT`).
    public var idleTimeout: Duration
    /// How long a push waits, after the confirm, for a passive reply decided by a worker
    /// (`INGRESS_REPLY_WAIT`, the default of the accounts that set no `reply_wait`); zero answers
    /// `success` at once.
    public var replyWait: Duration
    /// `WORKER_REPLY_MODE`, when the ingress is given the workers' variables: the reply mode of
    /// the accounts that set no `reply_mode` (no wait with `customer-service`; `passive-only`
    /// without a wait is refused).
    public var replyMode: String?
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
        let loaded = try AccountsConfiguration.load(env)
        let wait = try Self.replyWait(env.string("INGRESS_REPLY_WAIT"))
        let mode = env.string("WORKER_REPLY_MODE")
        if let mode, ReplyMode(rawValue: mode) == nil {
            let names = ReplyMode.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigurationError(variable: "WORKER_REPLY_MODE", reason: "must be one of \(names), not '\(mode)'")
        }
        replyMode = mode
        accounts = try loaded.accounts.map { try IngressAccount($0, defaultWait: wait, defaultMode: mode) }
        accountsFile = loaded.file
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
        idleTimeout = .seconds(try env.int("HTTP_IDLE_TIMEOUT", default: 30, range: 1...3600))
        replyWait = wait
    }

    /// `INGRESS_REPLY_WAIT`: seconds, with up to three decimals, 0 to 15 (WeChat gives a push
    /// 5 s and retries twice, so no answer is useful later than that).
    static func replyWait(_ text: String?, variable: String = "INGRESS_REPLY_WAIT") throws -> Duration {
        guard let text, !text.isEmpty else { return .zero }
        let parts = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let whole = Int(parts[0]), (0...15).contains(whole), parts[0].allSatisfy({ $0.isASCII && $0.isNumber }),
            parts.count == 1 || (1...3).contains(parts[1].count) && parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
            let fraction = parts.count == 2 ? Int(parts[1].padding(toLength: 3, withPad: "0", startingAt: 0)) : 0,
            whole < 15 || fraction == 0
        else {
            throw ConfigurationError(variable: variable, reason: "must be seconds from 0 to 15 (up to 3 decimals), not '\(text)'")
        }
        return .seconds(whole) + .milliseconds(fraction)
    }
}

/// One account as the ingress sees it: the Tokens and keys its pushes are checked with.
public struct IngressAccount: Sendable {
    public var appID: String
    /// Tokens accepted for signatures: the current one, then the previous one during a rotation.
    public var tokens: [String]
    /// Set when the account has an EncodingAESKey: enables compatible and safe modes (with the previous key for rotation).
    public var crypto: WeChatMessageCrypto?
    /// When set, a message whose `ToUserName` differs is rejected.
    public var accountID: String?
    /// The console's message mode: in ``IngressConfiguration/Encryption/safe`` a push without
    /// a valid `msg_signature` and `Encrypt` is refused.
    public var encryption: IngressConfiguration.Encryption

    /// How long a push waits for a passive reply: the account's `reply_wait`; else none when its
    /// `reply_mode` is `customer-service` (its workers never offer one); else `INGRESS_REPLY_WAIT`.
    public var replyWait: Duration
    /// How long after a push's arrival offers are taken: ``replyWait``, but at most 4.5 s, since
    /// WeChat drops an answer later than its 5 s (counted from before the push arrives). A longer
    /// wait (passive-only) holds the request without taking offers, so that WeChat gives up on it
    /// and pushes again, and the retry's ingress waits for the reply.
    public var offerWindow: Duration { min(replyWait, IngressConfiguration.latestUsefulAnswer) }

    /// - Throws: ``ConfigurationError`` naming the variable or the accounts file's entry.
    /// - Parameter defaultMode: `WORKER_REPLY_MODE`, for an account without `reply_mode`.
    public init(_ spec: AccountSpec, defaultWait: Duration = .zero, defaultMode: String? = nil) throws {
        appID = spec.appID
        let mode = spec.replyMode ?? defaultMode
        if let text = spec.replyWait {
            replyWait = try IngressConfiguration.replyWait(text, variable: spec.place(.replyWait))
        } else {
            replyWait = mode == ReplyMode.customerService.rawValue ? .zero : defaultWait
        }
        // passive-only without a wait: every reply would be dropped (no push waits for it).
        if mode == ReplyMode.passiveOnly.rawValue, replyWait == .zero {
            throw ConfigurationError(
                variable: spec.place(.replyWait), reason: "reply_mode passive-only needs a wait for the reply (reply_wait or INGRESS_REPLY_WAIT, 5 s)")
        }
        tokens = [try spec.require(.token)] + (spec.previousToken.map { [$0] } ?? [])
        func aesKey(_ field: AccountSpec.Field, _ text: String?) throws -> EncodingAESKey? {
            guard let text else { return nil }
            do {
                return try EncodingAESKey(text)
            } catch let e as WeChatError {
                throw ConfigurationError(variable: spec.place(field), reason: e.message)
            }
        }
        let key = try aesKey(.aesKey, spec.aesKey)
        let previous = try aesKey(.previousAESKey, spec.previousAESKey)
        if previous != nil, key == nil {
            throw ConfigurationError(variable: spec.place(.previousAESKey), reason: "is set but \(spec.place(.aesKey)) is not")
        }
        crypto = key.map { WeChatMessageCrypto(appID: spec.appID, key: $0, previousKey: previous) }
        accountID = spec.accountID
        if let text = spec.mode {
            guard let e = IngressConfiguration.Encryption(rawValue: text) else {
                throw ConfigurationError(variable: spec.place(.mode), reason: "must be plaintext, compatible or safe")
            }
            if e != .plaintext, key == nil {
                throw ConfigurationError(variable: spec.place(.mode), reason: "\(e.rawValue) mode needs \(spec.place(.aesKey))")
            }
            encryption = e
        } else {
            encryption = key == nil ? .plaintext : .compatible
        }
    }
}
