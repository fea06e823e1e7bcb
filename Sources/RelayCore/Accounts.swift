import Crypto
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals
import Yams

/// One Official Account as configured: from the single-account variables (`WECHAT_APPID`,
/// `WECHAT_TOKEN`, …) or from an entry of `WECHAT_ACCOUNTS_FILE` (docs/CONTRACT.md,
/// docs/operations.md "Many accounts"). Secrets are resolved (`env:NAME`, `file:PATH` or
/// inline); each service checks the fields it needs (``require(_:)``).
public struct AccountSpec: Sendable, Equatable {
    /// Where the account was configured, for error messages that name the place to fix.
    public enum Origin: Sendable, Equatable {
        case environment
        case file(path: String, index: Int)
    }

    /// The fields of an account, with their YAML key and their single-account variable.
    public enum Field: String, Sendable, CaseIterable {
        case appID = "appid", accountID = "account_id", mode, token, previousToken = "previous_token"
        case aesKey = "aes_key", previousAESKey = "previous_aes_key", secret, rules
        case replyMode = "reply_mode", replyWait = "reply_wait", decideURL = "decide_url"
        case sendRate = "send_rate", sendBurst = "send_burst", dailyQuota = "daily_quota"

        /// The variable that sets it for the account of the single-account variables.
        public var variable: String {
            switch self {
            case .appID: "WECHAT_APPID"
            case .accountID: "WECHAT_ACCOUNT_ID"
            case .mode: "WECHAT_ENCRYPTION"
            case .token: "WECHAT_TOKEN"
            case .previousToken: "WECHAT_PREVIOUS_TOKEN"
            case .aesKey: "WECHAT_AES_KEY"
            case .previousAESKey: "WECHAT_PREVIOUS_AES_KEY"
            case .secret: "WECHAT_SECRET"
            case .rules: "WORKER_RULES"
            case .replyMode: "WORKER_REPLY_MODE"
            case .replyWait: "INGRESS_REPLY_WAIT"
            case .decideURL: "WORKER_DECIDE_URL"
            case .sendRate: "WORKER_SEND_RATE"
            case .sendBurst: "WORKER_SEND_BURST"
            case .dailyQuota: "WORKER_DAILY_QUOTA"
            }
        }

        var isSecret: Bool { [.token, .previousToken, .aesKey, .previousAESKey, .secret].contains(self) }
    }

    public var origin: Origin
    public var appID: String
    /// The original id (`gh_…`): a push to another `ToUserName` is refused.
    public var accountID: String?
    /// `plaintext`, `compatible` or `safe` (checked by the ingress).
    public var mode: String?
    public var token: String?
    public var previousToken: String?
    public var aesKey: String?
    public var previousAESKey: String?
    public var secret: String?
    /// A reply-rules file (relative paths are relative to the accounts file).
    public var rules: String?
    public var replyMode: String?
    /// The ingress's wait for a passive reply (`INGRESS_REPLY_WAIT`'s format), for this account.
    public var replyWait: String?
    public var decideURL: String?
    /// Customer-service sends a second, shared by every worker (nil: the workers' default, 0: no limit).
    public var sendRate: Double?
    /// Sends allowed at once above the rate (nil: the default).
    public var sendBurst: Int?
    /// WeChat's daily customer-service quota, for the quota metrics and alert (nil: the default).
    public var dailyQuota: Int?

    public init(appID: String, origin: Origin = .environment) {
        self.appID = appID
        self.origin = origin
    }

    /// The name an error about `field` should carry: the variable, or the file and entry.
    public func place(_ field: Field) -> String {
        switch origin {
        case .environment: field.variable
        case .file(let path, let index): "WECHAT_ACCOUNTS_FILE (\(path), accounts[\(index)] \(appID), \(field.rawValue))"
        }
    }

    /// The value of `field`, or a ``ConfigurationError`` naming where to set it.
    public func require(_ field: Field) throws -> String {
        let value: String? =
            switch field {
            case .appID: appID
            case .accountID: accountID
            case .mode: mode
            case .token: token
            case .previousToken: previousToken
            case .aesKey: aesKey
            case .previousAESKey: previousAESKey
            case .secret: secret
            case .rules: rules
            case .replyMode: replyMode
            case .replyWait: replyWait
            case .decideURL: decideURL
            case .sendRate: sendRate.map { "\($0)" }
            case .sendBurst: sendBurst.map { "\($0)" }
            case .dailyQuota: dailyQuota.map { "\($0)" }
            }
        guard let value, !value.isEmpty else {
            throw ConfigurationError(variable: place(field), reason: "is required but not set")
        }
        return value
    }

    /// An AppID is a path segment and part of Redis keys: letters, digits, `_` and `-`, at most 64.
    public static func isValidAppID(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { $0.isASCIIAlphanumeric || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }
    }
}

extension UInt8 {
    fileprivate var isASCIIAlphanumeric: Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(self) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(self)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(self)
    }
}

/// The configured accounts: the single-account variables' account (when `WECHAT_APPID` is
/// set) and every entry of `WECHAT_ACCOUNTS_FILE` (when set), in that order, AppIDs unique.
public struct AccountsConfiguration: Sendable, Equatable {
    public var accounts: [AccountSpec]
    /// `WECHAT_ACCOUNTS_FILE`, when set: reloaded on SIGHUP and when it changes on disk.
    public var file: String?

    /// The account of a path `/wechat/<appid>`, of a message's `app-id`, of an API call.
    public func account(_ appID: String) -> AccountSpec? { accounts.first { $0.appID == appID } }

    /// The account `/wechat` (and tokend's paths without an appid) serve: the only one.
    public var single: AccountSpec? { accounts.count == 1 ? accounts[0] : nil }

    public init(accounts: [AccountSpec], file: String? = nil) {
        self.accounts = accounts
        self.file = file
    }

    /// Reads the accounts. The single-account variables describe one account (only the ones
    /// that `fields` lists are read, so each service reads its own); the file adds more.
    /// - Throws: ``ConfigurationError`` naming the variable, or the file and the entry.
    public static func load(_ env: RelayEnvironment) throws -> AccountsConfiguration {
        var accounts: [AccountSpec] = []
        if let appID = env.string("WECHAT_APPID") {
            guard AccountSpec.isValidAppID(appID) else {
                throw ConfigurationError(variable: "WECHAT_APPID", reason: "must be letters, digits, '_' or '-' (at most 64)")
            }
            var a = AccountSpec(appID: appID)
            a.accountID = env.string("WECHAT_ACCOUNT_ID")
            a.mode = env.string("WECHAT_ENCRYPTION")?.lowercased()
            a.token = env.string("WECHAT_TOKEN", isSecret: true)
            a.previousToken = env.string("WECHAT_PREVIOUS_TOKEN", isSecret: true)
            a.aesKey = env.string("WECHAT_AES_KEY", isSecret: true)
            a.previousAESKey = env.string("WECHAT_PREVIOUS_AES_KEY", isSecret: true)
            a.secret = env.string("WECHAT_SECRET", isSecret: true)
            accounts.append(a)
        }
        let path = env.string("WECHAT_ACCOUNTS_FILE")
        if let path {
            let text: String
            do {
                text = try String(contentsOfFile: path, encoding: .utf8)
            } catch {
                throw ConfigurationError(variable: "WECHAT_ACCOUNTS_FILE", reason: "cannot read '\(path)'")
            }
            accounts += try parse(text, path: path, env: env)
        }
        guard !accounts.isEmpty else {
            throw ConfigurationError(variable: "WECHAT_APPID", reason: "is required but not set (or set WECHAT_ACCOUNTS_FILE)")
        }
        var seen: Set<String> = []
        for a in accounts where !seen.insert(a.appID).inserted {
            throw ConfigurationError(variable: a.place(.appID), reason: "appid \(a.appID) is configured twice")
        }
        return AccountsConfiguration(accounts: accounts, file: path)
    }

    /// Parses an accounts file (`accounts:` then a list of mappings; unknown keys are refused,
    /// so that a misspelt key is not silently ignored).
    public static func parse(_ text: String, path: String, env: RelayEnvironment) throws -> [AccountSpec] {
        func fail(_ reason: String) -> ConfigurationError {
            ConfigurationError(variable: "WECHAT_ACCOUNTS_FILE", reason: "\(path): \(reason)")
        }
        // Composed, not loaded: every value is taken as the text written (a Token `0123456`
        // stays that, not the octal number 42798; `yes` stays `yes`).
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            // Only the first line (where and what): the rest quotes the file, which may hold secrets.
            throw fail("not valid YAML: \("\(error)".split(separator: "\n").first ?? "")")
        }
        guard let top = root?.mapping, let list = top["accounts"]?.sequence else {
            throw fail("expected a mapping with a list under 'accounts'")
        }
        if let extra = top.keys.first(where: { $0.string != "accounts" }) { throw fail("unknown key '\(extra.string ?? "?")'") }
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent()
        return try list.enumerated().map { index, item in
            guard let entry = item.mapping else { throw fail("accounts[\(index)] is not a mapping") }
            guard let appID = entry["appid"]?.scalar?.string, AccountSpec.isValidAppID(appID) else {
                throw fail("accounts[\(index)]: appid is missing or not letters, digits, '_' or '-' (at most 64)")
            }
            var a = AccountSpec(appID: appID, origin: .file(path: path, index: index))
            for (keyNode, value) in entry {
                let key = keyNode.string ?? "?"
                guard let field = AccountSpec.Field(rawValue: key) else { throw fail("accounts[\(index)] \(appID): unknown key '\(key)'") }
                // `key:`, `key: ~` or `key: null`: unset. Lists and mappings are mistakes.
                if value.null != nil { continue }
                guard let raw = value.scalar?.string else {
                    throw ConfigurationError(variable: a.place(field), reason: "must be a single value, not a list or a mapping")
                }
                let text = field.isSecret ? try resolveSecret(raw, place: a.place(field), env: env) : raw
                func number<T: LosslessStringConvertible & Comparable>(_ range: ClosedRange<T>) throws -> T {
                    guard let n = T(raw), range.contains(n) else {
                        throw ConfigurationError(variable: a.place(field), reason: "must be a number in \(range), got '\(raw)'")
                    }
                    return n
                }
                switch field {
                case .appID: break
                case .accountID: a.accountID = text
                case .mode: a.mode = text.lowercased()
                case .token: a.token = text
                case .previousToken: a.previousToken = text
                case .aesKey: a.aesKey = text
                case .previousAESKey: a.previousAESKey = text
                case .secret: a.secret = text
                case .rules: a.rules = text.hasPrefix("/") ? text : directory.appendingPathComponent(text).path
                case .replyMode: a.replyMode = text
                case .replyWait: a.replyWait = text
                case .decideURL: a.decideURL = text
                case .sendRate:
                    // 0 (no limit), or at least one send in 1,000 s: the limiter's interval stays a sane integer.
                    let rate: Double = try number(0.0...100_000.0)
                    guard rate == 0 || rate >= 0.001 else {
                        throw ConfigurationError(variable: a.place(field), reason: "must be 0 (no limit) or at least 0.001, got '\(raw)'")
                    }
                    a.sendRate = rate
                case .sendBurst: a.sendBurst = try number(1...100_000)
                case .dailyQuota: a.dailyQuota = try number(1...1_000_000_000)
                }
            }
            return a
        }
    }

    /// `env:NAME` (a variable, or the `.env` file), `file:PATH` (the file's contents without
    /// the trailing newline), or the value itself.
    static func resolveSecret(_ value: String, place: String, env: RelayEnvironment) throws -> String {
        if value.hasPrefix("env:") {
            let name = String(value.dropFirst(4))
            guard let v = env.string(name, isSecret: true) else {
                throw ConfigurationError(variable: place, reason: "refers to the variable \(name), which is not set")
            }
            return v
        }
        if value.hasPrefix("file:") {
            let file = String(value.dropFirst(5))
            guard let v = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw ConfigurationError(variable: place, reason: "cannot read the file '\(file)'")
            }
            let trimmed = v.trimmingCharacters(in: .newlines)
            guard !trimmed.isEmpty else { throw ConfigurationError(variable: place, reason: "the file '\(file)' is empty") }
            return trimmed
        }
        return value
    }
}

/// Reloads the accounts on SIGHUP and when `WECHAT_ACCOUNTS_FILE` changes on disk (checked
/// every `interval`), and hands each new set to `apply`. A file that does not load (or that
/// `apply` refuses) changes nothing: the running accounts stay, and the error is logged.
public struct AccountsReloader: Service {
    let file: String?
    let interval: Duration
    let load: @Sendable () async throws -> AccountsConfiguration
    let apply: @Sendable (AccountsConfiguration) async throws -> Void
    let logger: Logger

    public init(
        file: String?, interval: Duration = .seconds(2), logger: Logger,
        load: @escaping @Sendable () async throws -> AccountsConfiguration,
        apply: @escaping @Sendable (AccountsConfiguration) async throws -> Void
    ) {
        self.file = file
        self.interval = interval
        self.load = load
        self.apply = apply
        self.logger = logger
    }

    /// The file's digest (nil when unreadable), to notice a change.
    static func digest(_ path: String?) -> [UInt8]? {
        guard let path, let data = FileManager.default.contents(atPath: path) else { return nil }
        return Array(SHA256.hash(data: data))
    }

    public func run() async throws {
        let reloads = AsyncStream<String>.makeStream()
        let signals = Task {
            for await _ in await UnixSignalsSequence(trapping: .sighup) { reloads.continuation.yield("SIGHUP") }
        }
        let poll = Task { [file, interval] in
            var last = Self.digest(file)
            while !Task.isCancelled, file != nil {
                try? await Task.sleep(for: interval)
                let now = Self.digest(file)
                guard now != last, now != nil else { continue }
                // A file being written (not replaced whole) could be read half way: taken only
                // once it reads the same twice, 300 ms apart.
                try? await Task.sleep(for: .milliseconds(300))
                guard Self.digest(file) == now else { continue }
                last = now
                reloads.continuation.yield("the file changed")
            }
        }
        defer {
            signals.cancel()
            poll.cancel()
        }
        await cancelWhenGracefulShutdown {
            for await why in reloads.stream {
                do {
                    let accounts = try await load()
                    try await apply(accounts)
                    logger.notice(
                        "accounts reloaded", metadata: ["reason": "\(why)", "accounts": "\(accounts.accounts.map(\.appID).joined(separator: ","))"])
                } catch {
                    logger.error("accounts not reloaded; the running accounts stay", metadata: ["reason": "\(why)", "error": "\(error)"])
                }
            }
        }
    }
}

/// A value behind a lock, shareable by reference (for the structs that hold reloadable state,
/// and values tasks share).
public final class LockedValue<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R: Sendable>(_ body: (inout sending Value) -> sending R) -> R { mutex.withLock(body) }
    /// The value now (a copy).
    public func get() -> Value { mutex.withLock { $0 } }
    public func set(_ new: Value) { mutex.withLock { $0 = new } }
}
