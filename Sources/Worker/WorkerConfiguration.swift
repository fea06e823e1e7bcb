import AMQP
import Foundation
import Redis
import RelayCore
import RelayContract

/// The worker's settings (docs/CONTRACT.md, plus `WORKER_SESSION_TTL`).
public struct WorkerConfiguration: Sendable {
    /// Every account served, with its settings (the account's keys in `WECHAT_ACCOUNTS_FILE`,
    /// else the worker's variables); the first is the one a message without an AppID belongs to.
    public var accounts: [WorkerAccountSettings]
    /// `WECHAT_ACCOUNTS_FILE`, watched for changes (and re-read on SIGHUP).
    public var accountsFile: String?
    /// The first account's AppID (the single-account case).
    public var appID: String { accounts[0].appID }
    /// `WORKER_SEND_RATE`, `WORKER_SEND_BURST`, `WORKER_DAILY_QUOTA`: the defaults of accounts that set none.
    public var sendRate: Double
    public var sendBurst: Int?
    public var dailyQuota: Int
    public var amqp: AMQPConfiguration
    public var redis: RedisConfiguration
    public var apiURL: String
    public var tokendURL: String?
    public var tokendSecret: String?
    public var rules: ReplyRules
    var rulesText: String?
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
        let loaded = try AccountsConfiguration.load(env)
        accountsFile = loaded.file
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
        decideURL = try Self.decideURL(env.string("WORKER_DECIDE_URL"), variable: "WORKER_DECIDE_URL")
        // At most the worker's HTTP client's read timeout (10 s).
        decideTimeout = try env.int("WORKER_DECIDE_TIMEOUT", default: 3, range: 1...10)
        if let path = env.string("WORKER_RULES") {
            (rules, rulesText) = try Self.rules(path, variable: "WORKER_RULES")
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
        sendRate = try Self.number(env.string("WORKER_SEND_RATE"), variable: "WORKER_SEND_RATE", range: 0...100_000) ?? 0
        guard sendRate == 0 || sendRate >= 0.001 else {
            throw ConfigurationError(variable: "WORKER_SEND_RATE", reason: "must be 0 (no limit) or at least 0.001")
        }
        sendBurst = try env.string("WORKER_SEND_BURST").map { _ in try env.int("WORKER_SEND_BURST", default: 1, range: 1...100_000) }
        dailyQuota = try env.int("WORKER_DAILY_QUOTA", default: 500_000, range: 1...1_000_000_000)
        // Not in the contract: lets several deployments (or tests) share one broker and Redis.
        let prefix = env.string("WECHAT_QUEUE_PREFIX") ?? "wechat"
        if let problem = WorkerKeys.prefixProblem(prefix) { throw ConfigurationError(variable: "WECHAT_QUEUE_PREFIX", reason: problem) }
        topology = WeChatTopology(prefix: prefix)
        accounts = []
        accounts = try loaded.accounts.map(settings(for:))
    }

    /// An account's settings: its own keys where the accounts file sets them, else this worker's.
    /// - Throws: ``ConfigurationError`` naming the account's entry.
    public func settings(for spec: AccountSpec) throws -> WorkerAccountSettings {
        var rules = self.rules
        var rulesText = self.rulesText
        let decideURL = try spec.decideURL.map { try Self.decideURL($0, variable: spec.place(.decideURL)) } ?? self.decideURL
        if let path = spec.rules {
            (rules, rulesText) = try Self.rules(path, variable: spec.place(.rules))
        } else if spec.decideURL != nil, rulesText == nil {
            rules = ReplyRules(rules: [])  // as for WORKER_DECIDE_URL: the service decides everything
        }
        var mode = replyMode
        if let text = spec.replyMode {
            guard let m = ReplyMode(rawValue: text) else {
                throw ConfigurationError(variable: spec.place(.replyMode), reason: "must be customer-service, passive-first or passive-only, not '\(text)'")
            }
            mode = m
        }
        let rate = spec.sendRate ?? sendRate
        return WorkerAccountSettings(
            appID: spec.appID, rulesText: rulesText, rules: rules, decideURL: decideURL, replyMode: mode, sendRate: rate,
            sendBurst: spec.sendBurst ?? sendBurst ?? max(1, Int(rate.rounded(.up))), dailyQuota: spec.dailyQuota ?? dailyQuota)
    }

    static func rules(_ path: String, variable: String) throws -> (ReplyRules, String) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigurationError(variable: variable, reason: "cannot read '\(path)'")
        }
        do {
            return (try ReplyRules(yaml: text), text)
        } catch {
            throw ConfigurationError(variable: variable, reason: "\(error)")
        }
    }

    static func decideURL(_ url: String?, variable: String) throws -> String? {
        guard let url else { return nil }
        guard let u = URL(string: url), u.scheme == "http" || u.scheme == "https", u.host != nil else {
            throw ConfigurationError(variable: variable, reason: "must be an http:// or https:// URL")
        }
        // The HTTP client sends no credentials from a URL: refused rather than silently dropped.
        guard u.user == nil, u.password == nil else {
            throw ConfigurationError(variable: variable, reason: "must not carry credentials (user:password@)")
        }
        return url
    }

    static func number(_ text: String?, variable: String, range: ClosedRange<Double>) throws -> Double? {
        guard let text else { return nil }
        guard let n = Double(text.trimmingCharacters(in: .whitespaces)), n.isFinite, range.contains(n) else {
            throw ConfigurationError(variable: variable, reason: "must be a number in \(range.lowerBound)...\(range.upperBound), got '\(text)'")
        }
        return n
    }
}
