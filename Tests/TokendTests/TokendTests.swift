import Crypto
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import Redis
import RelayCore
import ServiceLifecycle
import Simulator
import TestSupport
import Testing
import TokenClient
import Tokend
import RelayContract

let tokendLogger: Logger = {
    var l = Logger(label: "tokend-test")
    l.logLevel = .critical
    return l
}()

/// Runs `body` with a fake WeChat API on a live port and a tokend wired to it and to the test Redis.
func withTokend(
    lifetime: Int = 7200, margin: Int = 600, mode: String = "stable", secret: String = "s3cret",
    _ body: @escaping @Sendable (FakePlatform, (String) throws -> Tokend, String) async throws -> Void
) async throws {
    let appID = "wx\(UInt32.random(in: 0 ... .max))"
    var settings = FakePlatform.Settings(appID: appID, secret: "s3cret")
    settings.tokenLifetime = .seconds(lifetime)
    let platform = FakePlatform(settings: settings)
    let api = Application(
        router: FakeAPI(platform: platform, logger: tokendLogger).router(),
        configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: tokendLogger)
    try await api.test(.live) { client in
        let port = try #require(client.port)
        let redisURL = try TestServices.redisURL()
        let make: (String) throws -> Tokend = { bearer in
            let env = RelayEnvironment([
                "WECHAT_APPID": appID, "WECHAT_SECRET": secret, "TOKEND_SECRET": bearer, "REDIS_URL": redisURL,
                "WECHAT_API_URL": "http://127.0.0.1:\(port)", "TOKEND_REFRESH_MARGIN": "\(margin)", "TOKEND_FETCH_MODE": mode,
            ])
            let configuration = try TokendConfiguration(env)
            return Tokend(configuration: configuration, redis: RedisPool(configuration: configuration.redis, size: 8, logger: tokendLogger), logger: tokendLogger)
        }
        try await body(platform, make, appID)
    }
}

let bearer = "tokend-test-secret"
let auth: HTTPFields = [.authorization: "Bearer \(bearer)"]

@Suite("wechat-tokend", .enabled(if: TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct TokendTests {
    @Test func fetchesAndStoresTheToken() async throws {
        try await withTokend { platform, make, appID in
            let tokend = try make(bearer)
            let stored = try await tokend.accessToken.refresh(.missing)
            #expect(platform.checkToken(stored.value) == nil)
            // Under the documented key, as JSON that workers read with one GET.
            let raw = try #require(try await tokend.redis.get("wechat:\(appID):access_token"))
            #expect(try JSONDecoder().decode(StoredCredential.self, from: Data(raw)) == stored)
            try await Application(router: buildTokendRouter(tokend)).test(.router) { (c: any TestClientProtocol) async throws in
                let r = try await c.execute(uri: "/v1/access-token", method: .get, headers: auth)
                #expect(r.status == .ok)
                let answer = try JSONDecoder().decode(AccessTokenAnswer.self, from: Data(r.body.readableBytesView))
                #expect(answer == AccessTokenAnswer(accessToken: stored.value, expiresAt: stored.expiresAt))
                #expect(try await c.execute(uri: "/readyz", method: .get).status == .ok)
                let metrics = String(buffer: try await c.execute(uri: "/metrics", method: .get).body)
                #expect(metrics.contains(#"tokend_refreshes_total{kind="access_token",reason="missing"} 1"#))
            }
            // The worker's client reads the same value.
            let client = TokenClient(redis: tokend.redis, keys: TokenKeys(appID: appID), tokendURL: nil, tokendSecret: nil)
            #expect(try await client.accessToken() == stored.value)
            #expect(platform.tokenCalls.stableToken == 1)
            tokend.redis.close()
        }
    }

    @Test func bearerIsRequired() async throws {
        try await withTokend { _, make, _ in
            let tokend = try make(bearer)
            try await Application(router: buildTokendRouter(tokend)).test(.router) { (c: any TestClientProtocol) async throws in
                for path in ["/v1/access-token", "/v1/jsapi-ticket"] {
                    #expect(try await c.execute(uri: path, method: .get).status == .unauthorized)
                    #expect(try await c.execute(uri: path, method: .get, headers: [.authorization: "Bearer wrong"]).status == .unauthorized)
                    #expect(try await c.execute(uri: path, method: .get, headers: [.authorization: bearer]).status == .unauthorized)
                }
                #expect(try await c.execute(uri: "/v1/access-token/refresh", method: .post, body: ByteBuffer(string: #"{"stale_token":"x"}"#)).status == .unauthorized)
                #expect(try await c.execute(uri: "/healthz", method: .get).status == .ok)
            }
            tokend.redis.close()
        }
    }

    @Test func proactiveRefreshHappensBeforeExpiry() async throws {
        // Tokens live 6 s; refresh when less than 4 s are left.
        try await withTokend(lifetime: 6, margin: 4) { _, make, _ in
            let tokend = try make(bearer)
            let group = ServiceGroup(configuration: .init(services: [.init(service: TokendRefresher(tokend: tokend))], logger: tokendLogger))
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                var events = tokend.events.makeAsyncIterator()
                let first = try #require(await events.next())
                #expect(first.kind == "access_token" && first.reason == .missing)
                // Await the proactive refresh of the access_token (no fixed sleep).
                var proactive: RefreshEvent?
                while let e = await events.next() {
                    if e.kind == "access_token", e.reason == .proactive { proactive = e; break }
                }
                let p = try #require(proactive)
                // A new token, refreshed because it was due (the stored one was still
                // there), not because it was missing; a later expiry. Whether it came
                // before the old expiry on the wall clock is a timing question for the
                // benchmarks, not for a test (a loaded CI machine delays timers).
                #expect(p.fingerprint != first.fingerprint)
                #expect(p.expiresAt >= first.expiresAt)
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
            }
            tokend.redis.close()
        }
    }

    @Test func compareAndRefreshIgnoresAnAlreadyReplacedToken() async throws {
        try await withTokend { platform, make, _ in
            let tokend = try make(bearer)
            let first = try await tokend.accessToken.refresh(.missing)
            let second = try await tokend.accessToken.refresh(.passive, stale: first.value)
            #expect(second.value != first.value)
            #expect(platform.tokenCalls.stableToken == 2)
            // Reporting the first token again changes nothing: it is no longer current.
            let again = try await tokend.accessToken.refresh(.passive, stale: first.value)
            #expect(again == second)
            #expect(platform.tokenCalls.stableToken == 2)
            tokend.redis.close()
        }
    }

    @Test func aRefreshStormMakesOneUpstreamCall() async throws {
        try await withTokend { platform, make, _ in
            let tokend = try make(bearer)
            let stale = try await tokend.accessToken.refresh(.missing).value
            let app = Application(router: buildTokendRouter(tokend))
            let answers = try await app.test(.router) { c in
                try await withThrowingTaskGroup(of: String.self) { group in
                    for _ in 0..<200 {
                        group.addTask {
                            let r = try await c.execute(
                                uri: "/v1/access-token/refresh", method: .post, headers: auth,
                                body: ByteBuffer(string: #"{"stale_token":"\#(stale)"}"#))
                            #expect(r.status == .ok)
                            return try JSONDecoder().decode(AccessTokenAnswer.self, from: Data(r.body.readableBytesView)).accessToken
                        }
                    }
                    return try await group.reduce(into: Set<String>()) { $0.insert($1) }
                }
            }
            #expect(answers.count == 1)
            #expect(answers.first != stale)
            #expect(platform.tokenCalls.stableToken == 2)  // the first fetch and one refresh
            tokend.redis.close()
        }
    }

    @Test func twoTokendProcessesRefreshOnce() async throws {
        try await withTokend { platform, make, _ in
            // Two independent instances (own keepers, own Redis pools), as two replicas would be.
            let a = try make(bearer), b = try make(bearer)
            let stale = try await a.accessToken.refresh(.missing).value
            let results = try await withThrowingTaskGroup(of: String.self) { group in
                for i in 0..<100 {
                    let keeper = i % 2 == 0 ? a.accessToken : b.accessToken
                    group.addTask { try await keeper.refresh(.passive, stale: stale).value }
                }
                return try await group.reduce(into: Set<String>()) { $0.insert($1) }
            }
            #expect(results.count == 1)
            #expect(platform.tokenCalls.stableToken == 2)
            a.redis.close()
            b.redis.close()
        }
    }

    @Test func theOldTokenKeepsWorkingDuringTheOverlap() async throws {
        try await withTokend(mode: "token") { platform, make, _ in
            let tokend = try make(bearer)
            let old = try await tokend.accessToken.refresh(.missing).value
            let new = try await tokend.accessToken.refresh(.passive, stale: old).value
            #expect(new != old)
            #expect(platform.tokenCalls.token == 2)
            // Both are accepted by the API for now: callers holding the old one are not cut off.
            #expect(platform.checkToken(old) == nil)
            #expect(platform.checkToken(new) == nil)
            tokend.redis.close()
        }
    }

    @Test func aBadSecretFailsReadinessWithAClearReason() async throws {
        try await withTokend(secret: "wrong-secret") { platform, make, _ in
            let tokend = try make(bearer)
            await #expect {
                try await tokend.accessToken.refresh(.missing)
            } throws: { ($0 as? UpstreamError)?.errcode == 40125 }
            try await Application(router: buildTokendRouter(tokend)).test(.router) { (c: any TestClientProtocol) async throws in
                let r = try await c.execute(uri: "/readyz", method: .get)
                #expect(r.status == .serviceUnavailable)
                let reason = String(buffer: r.body)
                #expect(reason.contains("40125") && reason.contains("WECHAT_SECRET"))
                #expect(!reason.contains("wrong-secret"))
            }
            tokend.redis.close()
        }
    }

    @Test func jssdkSignatureFollowsTheAlgorithm() async throws {
        try await withTokend { platform, make, appID in
            let tokend = try make(bearer)
            try await Application(router: buildTokendRouter(tokend)).test(.router) { (c: any TestClientProtocol) async throws in
                let t = try await c.execute(uri: "/v1/jsapi-ticket", method: .get, headers: auth)
                #expect(t.status == .ok)
                let ticket = try #require(try JSONDecoder().decode([String: AnyCodable].self, from: Data(t.body.readableBytesView))["ticket"]?.string)
                let r = try await c.execute(
                    uri: "/v1/jssdk/signature", method: .post, headers: auth,
                    body: ByteBuffer(string: #"{"url":"https://example.com/page?x=1&y=2#section"}"#))
                #expect(r.status == .ok)
                struct Answer: Decodable { var appId: String; var timestamp: Int64; var nonceStr: String; var signature: String }
                let a = try JSONDecoder().decode(Answer.self, from: Data(r.body.readableBytesView))
                #expect(a.appId == appID)
                // Computed independently: sha1 of the documented string, URL without its fragment.
                let text = "jsapi_ticket=\(ticket)&noncestr=\(a.nonceStr)&timestamp=\(a.timestamp)&url=https://example.com/page?x=1&y=2"
                let expected = Insecure.SHA1.hash(data: Array(text.utf8)).map { String(format: "%02x", $0) }.joined()
                #expect(a.signature == expected)
            }
            tokend.redis.close()
        }
    }
}


/// Just enough JSON decoding for mixed objects.
struct AnyCodable: Decodable {
    let string: String?
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        string = try? c.decode(String.self)
    }
}

@Suite("TokenClient (what workers use)", .enabled(if: TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct TokenClientTests {
    @Test func readsRedisAndAsksTokendToRefreshARejectedToken() async throws {
        try await withTokend { platform, make, appID in
            let tokend = try make(bearer)
            let first = try await tokend.accessToken.refresh(.missing).value
            let app = Application(router: buildTokendRouter(tokend), configuration: .init(address: .hostname("127.0.0.1", port: 0)))
            try await app.test(.live) { c in
                let port = try #require(c.port)
                // A generous deadline: this test is about one refresh for many callers, and a full
                // test run on two cores can hold a request back for longer than the production 10 s.
                let client = TokenClient(
                    redis: tokend.redis, keys: TokenKeys(appID: appID), tokendURL: "http://127.0.0.1:\(port)", tokendSecret: bearer,
                    tokendTimeout: .seconds(60))
                #expect(try await client.accessToken() == first)
                // Many workers report the same rejected token: one refresh, one new token for all.
                let renewed = try await withThrowingTaskGroup(of: String.self) { group in
                    for _ in 0..<20 { group.addTask { try await client.tokenRejected(first) } }
                    return try await group.reduce(into: Set<String>()) { $0.insert($1) }
                }
                #expect(renewed.count == 1 && renewed.first != first)
                #expect(try await client.accessToken() == renewed.first)
                #expect(platform.tokenCalls.stableToken == 2)
                // A wrong bearer is refused clearly.
                let intruder = TokenClient(
                    redis: tokend.redis, keys: TokenKeys(appID: appID), tokendURL: "http://127.0.0.1:\(port)", tokendSecret: "nope")
                await #expect(throws: TokenError.self) { try await intruder.tokenRejected(first) }
            }
            // Without tokend the client re-reads Redis.
            let local = TokenClient(redis: tokend.redis, keys: TokenKeys(appID: appID), tokendURL: nil, tokendSecret: nil)
            #expect(try await local.tokenRejected("whatever") == (try await tokend.accessToken.current())?.value)
            tokend.redis.close()
        }
    }
}

/// Regression tests of the hardening issue (#13), tokend part. Serialized: the virtual-clock
/// lifetimes make tens of thousands of Redis calls, and three at once starved the HTTP
/// deadlines of other tests in a full run.
@Suite("tokend hardening", .serialized, .enabled(if: TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct TokendHardeningTests {
    /// A clock the test moves.
    final class VirtualClock: Sendable {
        private let seconds = Locked<Int64>(1_800_000_000)
        var now: Int64 { seconds.withLock { $0 } }
        func advance(_ s: Int64) { seconds.withLock { $0 += s } }
    }

    /// #8: with the default 600 s margin, stable_token handed back the same token until 300 s
    /// before expiry, so the refresher asked once a second and every reader asked again:
    /// about 300 upstream calls per token. Over a whole lifetime on a virtual clock, with a
    /// reader every second and the refresher at its scheduled checks: at most 2.
    @Test(arguments: ["stable", "token", "ticket"])
    func atMostTwoUpstreamCallsPerLifetime(mode: String) async throws {
        let clock = VirtualClock()
        var settings = FakePlatform.Settings(appID: "wx1", secret: "s")
        settings.tokenLifetime = .seconds(7200)
        let platform = FakePlatform(settings: settings, now: { Date(timeIntervalSince1970: TimeInterval(clock.now)) })
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 2, logger: tokendLogger)
        let calls = Locked(0)
        let keeper = CredentialKeeper(
            kind: mode, key: TestServices.unique("tokend.virtual"), redis: redis, margin: .seconds(600), logger: tokendLogger,
            fetch: { reason, _ in
                calls.withLock { $0 += 1 }
                switch mode {
                case "stable":
                    let r = platform.issueStableToken(forceRefresh: reason == .passive)
                    return (r.accessToken, r.expiresIn)
                case "token":
                    let r = platform.issueToken()
                    return (r.accessToken, r.expiresIn)
                default:
                    let r = platform.issueTicket()
                    return (r.ticket, r.expiresIn)
                }
            }, onEvent: { _ in }, now: { clock.now })
        let first = try await keeper.refresh(.missing)
        #expect(calls.withLock { $0 } == 1)
        var next = await keeper.nextCheck(for: first)
        var values: Set<String> = [first.value]
        for _ in 0..<7200 {
            clock.advance(1)
            // A reader every second.
            let read = try await keeper.refresh(.missing)
            #expect(read.isValid(at: clock.now))
            // The refresher at its scheduled checks.
            if clock.now >= next {
                let c = try await keeper.refresh(.proactive)
                values.insert(c.value)
                next = await keeper.nextCheck(for: c)
            }
        }
        let upstream = calls.withLock { $0 } - 1
        #expect(upstream >= 1, "renewed at least once in a lifetime")
        #expect(upstream <= 2, "\(upstream) upstream calls in one lifetime")
        #expect(values.count == 2)
        redis.close()
    }

    /// #9: a passive refresh that joined an in-flight proactive refresh got the rejected token back.
    @Test func aPassiveRefreshJoiningAProactiveOneIsNotSwallowed() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 2, logger: tokendLogger)
        let (proactiveStarted, reportStart) = AsyncStream<Void>.makeStream()
        let gate = Locked<CheckedContinuation<Void, Never>?>(nil)
        let keeper = CredentialKeeper(
            kind: "access_token", key: TestServices.unique("tokend.passive"), redis: redis, margin: .seconds(7200), logger: tokendLogger,
            fetch: { reason, _ in
                switch reason {
                case .missing: return ("T1", 7200)
                case .proactive:
                    // Held until the passive request has joined; then the same token comes back.
                    await withCheckedContinuation { c in
                        gate.withLock { $0 = c }
                        reportStart.yield()
                    }
                    return ("T1", 7199)
                case .passive: return ("T2", 7200)
                }
            }, onEvent: { _ in })
        _ = try await keeper.refresh(.missing)
        let proactive = Task { try await keeper.refresh(.proactive) }
        var started = proactiveStarted.makeAsyncIterator()
        await started.next()
        let passive = Task { try await keeper.refresh(.passive, stale: "T1") }
        // Release the proactive fetch once the passive request has joined it.
        try await eventually("the passive request joined the refresh in flight") { await keeper.hasWaiters }
        gate.withLock { $0 }?.resume()
        #expect(try await proactive.value.value == "T1")
        #expect(try await passive.value.value == "T2")
        redis.close()
    }
}
