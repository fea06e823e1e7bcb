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
import TokenClient
import WeChat
import RelayContract

/// tokend's settings (docs/CONTRACT.md, plus `TOKEND_FETCH_MODE` and `TOKEND_REFRESH_MARGIN`).
public struct TokendConfiguration: Sendable {
    public var appID: String
    public var secret: String
    public var apiURL: String
    public var redis: RedisConfiguration
    public var bearer: String
    public var host: String
    public var port: Int
    public var endpoint: WeChatUpstream.TokenEndpoint
    /// Refresh when less than this is left (default 10 minutes).
    public var margin: Duration
    public var keys: TokenKeys

    public init(_ env: RelayEnvironment) throws {
        appID = try env.required("WECHAT_APPID")
        secret = try env.required("WECHAT_SECRET", isSecret: true)
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
        // Every Redis key under WECHAT_QUEUE_PREFIX, like the worker's, so deployments can share a Redis.
        keys = TokenKeys(appID: appID, prefix: env.string("WECHAT_QUEUE_PREFIX") ?? "wechat")
    }
}

/// The central control server: keeps the access_token and the jsapi_ticket fresh in Redis.
public final class Tokend: Sendable {
    public let configuration: TokendConfiguration
    public let redis: RedisPool
    public let accessToken: CredentialKeeper
    public let jsapiTicket: CredentialKeeper
    public let registry: PrometheusCollectorRegistry
    let logger: Logger
    private let refreshes: @Sendable (String, RefreshReason) -> Void
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
        let factory = PrometheusMetricsFactory(registry: registry)
        let counters = ["access_token", "jsapi_ticket"].flatMap { kind in
            [RefreshReason.missing, .proactive, .passive].map { reason in
                ("\(kind)/\(reason.rawValue)", CoreMetrics.Counter(
                    label: "tokend_refreshes_total", dimensions: [("kind", kind), ("reason", reason.rawValue)], factory: factory))
            }
        }
        let byKey = Dictionary(uniqueKeysWithValues: counters)
        refreshes = { kind, reason in byKey["\(kind)/\(reason.rawValue)"]?.increment() }
        upstreamErrors = CoreMetrics.Counter(label: "tokend_upstream_errors_total", factory: factory)
        tokenAge = CoreMetrics.Gauge(label: "tokend_token_age_seconds", factory: factory)
        (events, eventSink) = AsyncStream<RefreshEvent>.makeStream()
        let upstream = WeChatUpstream(
            apiURL: configuration.apiURL, appID: configuration.appID, secret: configuration.secret,
            endpoint: configuration.endpoint, http: http)
        let sink = eventSink
        let count = refreshes
        let onEvent: @Sendable (RefreshEvent) -> Void = { e in
            count(e.kind, e.reason)
            sink.yield(e)
        }
        let tokenKeeper = CredentialKeeper(
            kind: "access_token", key: configuration.keys.accessToken, redis: redis, margin: configuration.margin,
            logger: logger,
            fetch: { reason, _ in
                let r = try await upstream.accessToken(force: reason == .passive)
                return (r.accessToken, r.expiresIn)
            }, onEvent: onEvent)
        accessToken = tokenKeeper
        jsapiTicket = CredentialKeeper(
            kind: "jsapi_ticket", key: configuration.keys.jsapiTicket, redis: redis, margin: configuration.margin,
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

    /// Why tokend is not ready, or nil when it is: Redis reachable, a valid token stored,
    /// and no configuration error from WeChat (bad appid, bad secret, IP not whitelisted).
    public func notReadyReason() async -> String? {
        if let e = await accessToken.lastError, e.disposition == .alert {
            return "WeChat refuses our credentials: \(e) — check WECHAT_APPID, WECHAT_SECRET and the IP whitelist"
        }
        do {
            guard let c = try await accessToken.current(), c.isValid(at: CredentialKeeper.wallClock()) else {
                if let e = await accessToken.lastError { return "no valid access_token yet: \(e)" }
                return "no valid access_token yet"
            }
            return nil
        } catch {
            return "Redis unreachable: \(error)"
        }
    }

    func recordUpstreamError(_ error: any Error) { if error is UpstreamError { upstreamErrors.increment() } }

    func renderMetrics() async -> String {
        if let c = try? await accessToken.current() { tokenAge.record(CredentialKeeper.wallClock() - c.fetchedAt) }
        return registry.emitToString()
    }
}

/// The proactive refresher: keeps both credentials fresh, with backoff on errors
/// (never a hot loop, even when WeChat refuses the secret).
public struct TokendRefresher: Service {
    let tokend: Tokend

    public init(tokend: Tokend) { self.tokend = tokend }

    public func run() async throws {
        var backoff: Duration = .seconds(1)
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            var next: Duration = .seconds(60)
            do {
                for keeper in [tokend.accessToken, tokend.jsapiTicket] {
                    let had = try await keeper.current()
                    let c = try await keeper.refresh(had == nil ? .missing : .proactive)
                    // Due again at the margin (or the renewal point, when the upstream handed
                    // back the same value); at least every 60 s, at most every second.
                    let due = Double(await keeper.nextCheck(for: c) - CredentialKeeper.wallClock())
                    next = min(next, .seconds(max(1, min(60, due))))
                }
                backoff = .seconds(1)
            } catch {
                tokend.recordUpstreamError(error)
                let alert = (error as? UpstreamError)?.disposition == .alert
                tokend.logger.log(
                    level: alert ? .critical : .error, "refresh failed; retrying",
                    metadata: ["error": "\(error)", "retry_in": "\(alert ? Duration.seconds(60) : backoff)"])
                next = alert ? .seconds(60) : backoff
                backoff = min(backoff * 2, .seconds(60))
            }
            let wait = next
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: wait) }
        }
    }
}

