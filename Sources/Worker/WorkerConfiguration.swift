import AMQP
import Foundation
import Redis
import RelayCore
import RelayContract

/// The worker's settings (docs/CONTRACT.md, plus `WORKER_SESSION_TTL`).
public struct WorkerConfiguration: Sendable {
    public var appID: String
    public var amqp: AMQPConfiguration
    public var redis: RedisConfiguration
    public var apiURL: String
    public var tokendURL: String?
    public var tokendSecret: String?
    public var rules: ReplyRules
    public var concurrency: Int
    public var metricsPort: Int
    public var sessionTTL: Int
    /// How long a finished message's record (and a signed query's claim) is kept, seconds (`WORKER_FINISHED_TTL`).
    public var finishedTTL: Int
    /// What to do with a message whose earlier send may have reached WeChat (`WORKER_UNCERTAIN_SEND`).
    public var uncertainSend: UncertainSend
    /// How long a worker's claim on a message holds the others off, seconds (`WORKER_CLAIM_LEASE`).
    public var claimLease: Int
    /// The decision service (`WORKER_DECIDE_URL`), if any, and its deadline in seconds (`WORKER_DECIDE_TIMEOUT`).
    public var decideURL: String?
    public var decideTimeout: Int
    public var topology: WeChatTopology
    /// How replies go out (`WORKER_REPLY_MODE`).
    public var replyMode: ReplyMode

    public init(_ env: RelayEnvironment) throws {
        appID = try env.required("WECHAT_APPID")
        do {
            amqp = try AMQPConfiguration(
                url: env.string("AMQP_URL", isSecret: true) ?? "amqp://guest:guest@127.0.0.1:5672/%2F", connectionName: "wechat-worker")
        } catch let e as AMQPError {
            throw ConfigurationError(variable: "AMQP_URL", reason: e.message)
        }
        do {
            redis = try RedisConfiguration(url: env.string("REDIS_URL", isSecret: true) ?? "redis://127.0.0.1:6379/0")
        } catch let e as RedisError {
            throw ConfigurationError(variable: "REDIS_URL", reason: e.message)
        }
        apiURL = env.string("WECHAT_API_URL") ?? "https://api.weixin.qq.com"
        tokendURL = env.string("TOKEND_URL")
        tokendSecret = env.string("TOKEND_SECRET", isSecret: true)
        if tokendURL != nil, tokendSecret == nil {
            throw ConfigurationError(variable: "TOKEND_SECRET", reason: "is required when TOKEND_URL is set")
        }
        decideURL = env.string("WORKER_DECIDE_URL")
        if let url = decideURL {
            guard let u = URL(string: url), u.scheme == "http" || u.scheme == "https", u.host != nil else {
                throw ConfigurationError(variable: "WORKER_DECIDE_URL", reason: "must be an http:// or https:// URL")
            }
            // The HTTP client sends no credentials from a URL: refused rather than silently dropped.
            guard u.user == nil, u.password == nil else {
                throw ConfigurationError(variable: "WORKER_DECIDE_URL", reason: "must not carry credentials (user:password@)")
            }
        }
        // At most the worker's HTTP client's read timeout (10 s).
        decideTimeout = try env.int("WORKER_DECIDE_TIMEOUT", default: 3, range: 1...10)
        if let path = env.string("WORKER_RULES") {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ConfigurationError(variable: "WORKER_RULES", reason: "cannot read '\(path)'")
            }
            do {
                rules = try ReplyRules(yaml: text)
            } catch {
                throw ConfigurationError(variable: "WORKER_RULES", reason: "\(error)")
            }
        } else {
            // With a decision service and no rules file, the service decides everything (the
            // built-in rules end in a catch-all that would leave it nothing).
            rules = decideURL == nil ? .defaults : ReplyRules(rules: [])
        }
        concurrency = try env.int("WORKER_CONCURRENCY", default: 64, range: 1...10_000)
        metricsPort = try env.port("METRICS_PORT", default: 9100)
        sessionTTL = try env.int("WORKER_SESSION_TTL", default: 30 * 86400, range: 60...(365 * 86400))
        finishedTTL = try env.int("WORKER_FINISHED_TTL", default: 3600, range: 60...86400)
        let uncertain = env.string("WORKER_UNCERTAIN_SEND") ?? UncertainSend.resend.rawValue
        guard let policy = UncertainSend(rawValue: uncertain) else {
            throw ConfigurationError(variable: "WORKER_UNCERTAIN_SEND", reason: "must be resend or skip, not '\(uncertain)'")
        }
        uncertainSend = policy
        // Keep it well above the 5 s send timeout: a send is only made within the first half.
        claimLease = try env.int("WORKER_CLAIM_LEASE", default: 30, range: 1...3600)
        let mode = env.string("WORKER_REPLY_MODE") ?? ReplyMode.customerService.rawValue
        guard let replyMode = ReplyMode(rawValue: mode) else {
            throw ConfigurationError(
                variable: "WORKER_REPLY_MODE", reason: "must be customer-service, passive-first or passive-only, not '\(mode)'")
        }
        self.replyMode = replyMode
        // Not in the contract: lets several deployments (or tests) share one broker and Redis.
        topology = WeChatTopology(prefix: env.string("WECHAT_QUEUE_PREFIX") ?? "wechat")
    }
}
