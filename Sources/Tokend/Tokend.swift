import AsyncHTTPClient
import CoreMetrics
import Foundation
import Hummingbird
import Logging
import NIOCore
import Prometheus
import Redis
import RelayCore
import ServiceLifecycle
import Synchronization
import TokenClient
import WeChat
import RelayContract

/// tokend's settings (docs/CONTRACT.md, plus `TOKEND_FETCH_MODE` and `TOKEND_REFRESH_MARGIN`).
public struct TokendConfiguration: Sendable {
    /// The accounts whose credentials tokend keeps (the single-account variables' and
    /// `WECHAT_ACCOUNTS_FILE`'s); ``Tokend/reload(_:)`` replaces them.
    public var accounts: [TokendAccountSettings]
    /// `WECHAT_ACCOUNTS_FILE`, watched for changes (and re-read on SIGHUP).
    public var accountsFile: String?
    public var apiURL: String
    public var redis: RedisConfiguration
    public var bearer: String
    public var host: String
    public var port: Int
    public var endpoint: WeChatUpstream.TokenEndpoint
    /// Refresh when less than this is left (default 10 minutes).
    public var margin: Duration
    /// `WECHAT_QUEUE_PREFIX`: every Redis key under it, like the worker's, so deployments can share a Redis.
    public var prefix: String

    public init(_ env: RelayEnvironment) throws {
        let loaded = try AccountsConfiguration.load(env)
        accounts = try Self.accounts(loaded)
        accountsFile = loaded.file
        apiURL = env.string("WECHAT_API_URL") ?? "https://api.weixin.qq.com"
        do {
            redis = try RedisConfiguration(url: env.string("REDIS_URL", isSecret: true) ?? "redis://127.0.0.1:6379/0")
        } catch let e as RedisError {
            throw ConfigurationError(variable: "REDIS_URL", reason: e.message)
        }
        bearer = try env.required("TOKEND_SECRET", isSecret: true)
        host = env.string("HTTP_HOST") ?? "0.0.0.0"
        port = try env.port("HTTP_PORT", default: 8081)
        let mode = env.string("TOKEND_FETCH_MODE") ?? "stable"
        guard let e = WeChatUpstream.TokenEndpoint(rawValue: mode) else {
            throw ConfigurationError(variable: "TOKEND_FETCH_MODE", reason: "must be 'stable' or 'token', got '\(mode)'")
        }
        endpoint = e
        margin = .seconds(try env.int("TOKEND_REFRESH_MARGIN", default: 600, range: 1...7000))
        prefix = env.string("WECHAT_QUEUE_PREFIX") ?? "wechat"
        if let problem = WorkerKeys.prefixProblem(prefix) { throw ConfigurationError(variable: "WECHAT_QUEUE_PREFIX", reason: problem) }
    }

    /// Every account needs its AppSecret.
    public static func accounts(_ loaded: AccountsConfiguration) throws -> [TokendAccountSettings] {
        try loaded.accounts.map { TokendAccountSettings(appID: $0.appID, secret: try $0.require(.secret)) }
    }
}

/// One account's credentials for tokend.
public struct TokendAccountSettings: Sendable, Equatable {
    public var appID: String
    public var secret: String
}

/// One account's two keepers (access_token and jsapi_ticket), with their upstream.
public final class TokendAccount: Sendable {
    public let settings: TokendAccountSettings
    public var appID: String { settings.appID }
    public let accessToken: CredentialKeeper
    public let jsapiTicket: CredentialKeeper

    init(
        _ settings: TokendAccountSettings, configuration: TokendConfiguration, redis: RedisPool, http: HTTPClient, logger: Logger,
        onEvent: @escaping @Sendable (RefreshEvent) -> Void
    ) {
        self.settings = settings
        var logger = logger
        logger[metadataKey: "wechat.appid"] = "\(settings.appID)"
        let keys = TokenKeys(appID: settings.appID, prefix: configuration.prefix)
        let upstream = WeChatUpstream(
            apiURL: configuration.apiURL, appID: settings.appID, secret: settings.secret, endpoint: configuration.endpoint, http: http)
        let tokenKeeper = CredentialKeeper(
            kind: "access_token", key: keys.accessToken, redis: redis, margin: configuration.margin,
            logger: logger,
            fetch: { reason, _ in
                let r = try await upstream.accessToken(force: reason == .passive)
                return (r.accessToken, r.expiresIn)
            }, onEvent: onEvent)
        accessToken = tokenKeeper
        jsapiTicket = CredentialKeeper(
            kind: "jsapi_ticket", key: keys.jsapiTicket, redis: redis, margin: configuration.margin,
            logger: logger,
            fetch: { _, _ in
                var token = try await tokenKeeper.refresh(.missing).value
                do {
                    let t = try await upstream.jsapiTicket(accessToken: token)
                    return (t.ticket, t.expiresIn)
                } catch let e as UpstreamError where e.disposition == .refreshToken {
                    token = try await tokenKeeper.refresh(.passive, stale: token).value
                    let t = try await upstream.jsapiTicket(accessToken: token)
                    return (t.ticket, t.expiresIn)
                }
            }, onEvent: onEvent)
    }
}

/// The central control server: keeps each account's access_token and jsapi_ticket fresh in Redis.
public final class Tokend: Sendable {
    public let configuration: TokendConfiguration
    public let redis: RedisPool
    public let registry: PrometheusCollectorRegistry
    let logger: Logger
    let http: HTTPClient
    private let accounts: Mutex<[String: TokendAccount]>
    private let onEvent: @Sendable (RefreshEvent) -> Void
    private let upstreamErrors: CoreMetrics.Counter
    private let tokenAge: CoreMetrics.Gauge
    /// Every refresh, for this repository's tests.
    package let events: AsyncStream<RefreshEvent>
    private let eventSink: AsyncStream<RefreshEvent>.Continuation

    public init(configuration: TokendConfiguration, redis: RedisPool, http: HTTPClient = .shared, logger: Logger, registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.configuration = configuration
        self.redis = redis
        self.logger = logger
        self.registry = registry
        self.http = http
        let factory = PrometheusMetricsFactory(registry: registry)
        let counters = ["access_token", "jsapi_ticket"].flatMap { kind in
            [RefreshReason.missing, .proactive, .passive].map { reason in
                ("\(kind)/\(reason.rawValue)", CoreMetrics.Counter(
                    label: "tokend_refreshes_total", dimensions: [("kind", kind), ("reason", reason.rawValue)], factory: factory))
            }
        }
        let byKey = Dictionary(uniqueKeysWithValues: counters)
        upstreamErrors = CoreMetrics.Counter(label: "tokend_upstream_errors_total", factory: factory)
        tokenAge = CoreMetrics.Gauge(label: "tokend_token_age_seconds", factory: factory)
        (events, eventSink) = AsyncStream<RefreshEvent>.makeStream()
        let sink = eventSink
        onEvent = { e in
            byKey["\(e.kind)/\(e.reason.rawValue)"]?.increment()
            sink.yield(e)
        }
        accounts = Mutex([:])
        let built = configuration.accounts.map {
            TokendAccount($0, configuration: configuration, redis: redis, http: http, logger: logger, onEvent: onEvent)
        }
        accounts.withLock { a in for k in built { a[k.appID] = k } }
    }

    /// The first configured account's access_token keeper (the single-account case).
    public var accessToken: CredentialKeeper { first.accessToken }
    /// The first configured account's jsapi_ticket keeper.
    public var jsapiTicket: CredentialKeeper { first.jsapiTicket }
    private var first: TokendAccount {
        let id = configuration.accounts[0].appID
        return accounts.withLock { a in a[id] ?? a.values.sorted { $0.appID < $1.appID }[0] }
    }

    /// The account `/v1/accounts/<appid>/…` names, or the only one for the paths without an
    /// AppID (nil when several are configured: those paths then answer 404).
    public func account(_ appID: String?) -> TokendAccount? {
        accounts.withLock { a in
            guard let appID else { return a.count == 1 ? a.first?.value : nil }
            return a[appID]
        }
    }

    /// Every account, sorted by AppID.
    public var allAccounts: [TokendAccount] { accounts.withLock { Array($0.values) }.sorted { $0.appID < $1.appID } }

    /// Replaces the accounts (a reload): an account whose AppID and secret did not change keeps
    /// its keepers (and their in-flight refreshes); a removed one is no longer served or refreshed
    /// (its credentials stay in Redis until they expire).
    public func reload(_ loaded: AccountsConfiguration) throws {
        let wanted = try TokendConfiguration.accounts(loaded)
        accounts.withLock { a in
            var next: [String: TokendAccount] = [:]
            for s in wanted {
                if let kept = a[s.appID], kept.settings == s {
                    next[s.appID] = kept
                } else {
                    next[s.appID] = TokendAccount(s, configuration: configuration, redis: redis, http: http, logger: logger, onEvent: onEvent)
                }
            }
            a = next
        }
    }

    /// Why tokend is not ready, or nil when it is: Redis reachable, a valid token stored for
    /// every account, and no configuration error from WeChat (bad appid, bad secret, IP not whitelisted).
    public func notReadyReason() async -> String? {
        for account in allAccounts {
            let prefix = configuration.accounts.count == 1 && allAccounts.count == 1 ? "" : "\(account.appID): "
            if let e = await account.accessToken.lastError, e.disposition == .alert {
                return prefix + "WeChat refuses our credentials: \(e) — check WECHAT_APPID, WECHAT_SECRET and the IP whitelist"
            }
            do {
                guard let c = try await account.accessToken.current(), c.isValid(at: CredentialKeeper.wallClock()) else {
                    if let e = await account.accessToken.lastError { return prefix + "no valid access_token yet: \(e)" }
                    return prefix + "no valid access_token yet"
                }
            } catch {
                return "Redis unreachable: \(error)"
            }
        }
        return nil
    }

    func recordUpstreamError(_ error: any Error) { if error is UpstreamError { upstreamErrors.increment() } }

    func renderMetrics() async -> String {
        var oldest: Int64?
        for account in allAccounts {
            if let c = try? await account.accessToken.current() { oldest = max(oldest ?? 0, CredentialKeeper.wallClock() - c.fetchedAt) }
        }
        if let oldest { tokenAge.record(oldest) }
        return registry.emitToString()
    }
}

/// The proactive refresher: keeps both credentials fresh, with backoff on errors
/// (never a hot loop, even when WeChat refuses the secret).
public struct TokendRefresher: Service {
    let tokend: Tokend

    public init(tokend: Tokend) { self.tokend = tokend }

    /// Refreshes one account's credentials when due; returns when to look again and the
    /// back-off to use after the next failure (nil: none, it succeeded).
    static func refresh(_ account: TokendAccount, backoff b: Duration, tokend: Tokend) async -> (String, Duration, Duration?) {
        var next: Duration = .seconds(60)
        do {
            for keeper in [account.accessToken, account.jsapiTicket] {
                let had = try await keeper.current()
                let c = try await keeper.refresh(had == nil ? .missing : .proactive)
                // Due again at the margin (or the renewal point, when the upstream handed
                // back the same value); at least every 60 s, at most every second.
                let left = Double(await keeper.nextCheck(for: c) - CredentialKeeper.wallClock())
                next = min(next, .seconds(max(1, min(60, left))))
            }
            return (account.appID, next, nil)
        } catch {
            tokend.recordUpstreamError(error)
            let alert = (error as? UpstreamError)?.disposition == .alert
            tokend.logger.log(
                level: alert ? .critical : .error, "refresh failed; retrying",
                metadata: ["wechat.appid": "\(account.appID)", "error": "\(error)", "retry_in": "\(alert ? Duration.seconds(60) : b)"])
            return (account.appID, alert ? .seconds(60) : b, min(b * 2, .seconds(60)))
        }
    }

    public func run() async throws {
        // Per account: when it is due, and its back-off. One account failing (a wrong secret)
        // neither stops nor speeds up the others' refreshes.
        var due: [String: ContinuousClock.Instant] = [:]
        var backoff: [String: Duration] = [:]
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            let accounts = tokend.allAccounts
            let dueNow = accounts.filter { (due[$0.appID] ?? .now) <= .now }
            // Side by side: one account's slow upstream (or another replica's lock) delays no other.
            let results = await withTaskGroup(of: (String, Duration, Duration?).self) { group in
                for account in dueNow {
                    let b = backoff[account.appID] ?? .seconds(1)
                    group.addTask { await Self.refresh(account, backoff: b, tokend: tokend) }
                }
                var out: [(String, Duration, Duration?)] = []
                for await r in group { out.append(r) }
                return out
            }
            for (appID, next, nextBackoff) in results {
                due[appID] = .now + next
                backoff[appID] = nextBackoff
            }
            let live = Set(accounts.map(\.appID))
            due = due.filter { live.contains($0.key) }
            // Wake for the earliest due account, and at least every second (an account added by a reload).
            let earliest = due.values.min() ?? .now
            let next = max(.milliseconds(10), min(.seconds(1), earliest - .now))
            let wait = next
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: wait) }
        }
    }
}

