import Foundation
import Redis
import RelayContract
import RelayCore
import Simulator
import TestSupport
import Testing
import Tokend
import WeChat

@testable import Worker

/// #18: the Redis key layout a Redis Cluster needs (docs/worker.md, "Redis Cluster"): every
/// script's keys are one user's (one hash tag, `{<openid>}`) or a single key.
@Suite("Redis key layout", .enabled(if: TestServices.redisEnabled), .timeLimit(.minutes(3)))
struct KeyLayoutTests {
    /// Every script and command the worker and tokend run, on a one-node Redis Cluster (which
    /// refuses keys in more than one slot, `CROSSSLOT`, as a real cluster does). Before the
    /// per-user hash tags the first observe was refused.
    @Test func everyScriptRunsOnARedisCluster() async throws {
        let cluster = try await PrivateRedis(cluster: true)
        defer { cluster.stop() }
        let redis = RedisPool(configuration: try RedisConfiguration(url: cluster.url), size: 2, logger: workerLogger)
        defer { redis.close() }
        let store = SessionStore(redis: redis, appID: "wxcluster", prefix: "cl")
        let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oSlot", to: "gh", msgID: 1))
        let fence = try await store.takeFence(shard: 0)
        let seen = try await store.observe(m, now: 1, signedQuery: "1700000000:42:abc", fence: fence)
        #expect(seen.isNew)
        let decision = ReplyRules.Decision(reply: CustomerServiceMessage(toUser: "oSlot", content: .text(content: "hi")), setState: "menu")
        let (_, first) = try await store.commitAndClaim(decision, for: m, worker: "a", fence: fence, lease: .seconds(30))
        #expect(first == .claimed)
        try await store.releaseClaim(m, worker: "a")
        #expect(try await store.claim(m, worker: "a", fence: fence, lease: .seconds(30)) == .claimed)
        #expect(try await store.markReplied(m, sent: true) == 1)
        #expect(try await store.observe(m, now: 2, signedQuery: "1700000000:42:abc", fence: fence).replied)
        // A passive reply's mark and its kept decision.
        let p = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oSlot2", to: "gh", msgID: 2))
        _ = try await store.observe(p, now: 3, fence: fence)
        _ = try await store.commit(decision, for: p)
        #expect(try await store.markReplied(p, sent: false, passive: true) == 0)
        let again = try await store.observe(p, now: 4, fence: fence)
        #expect(again.repliedPassively && again.decision == decision)
        // The send-rate limiter and the membership: a key each.
        _ = try await SendRateLimiter(redis: redis, key: store.keys.sendRate, rate: 100, burst: 1).reserve()
        #expect(try await Membership(redis: redis, key: store.keys.workers, id: "w1").heartbeat() == ["w1"])
        // tokend's credential keeper: its value and its lock.
        let keeper = TokenKeys(appID: "wxcluster", prefix: "cl")
        #expect(try await redis.set(keeper.lock(keeper.accessToken), to: "me", expiration: .seconds(5), condition: .ifAbsent))
    }

    /// A user's keys share its hash tag; braces in an OpenID are escaped (else the tag would end
    /// early and split the user's keys over two slots); braces in the prefix are refused.
    @Test func theUserTagIsTheOpenIDEscaped() throws {
        let keys = WorkerKeys(prefix: "wechat", appID: "wx1")
        #expect(keys.session("oA-b_1") == "wechat:wx1:{oA-b_1}:session")
        #expect(keys.record("oA-b_1", "oA-b_1:9") == "wechat:wx1:{oA-b_1}:msg:oA-b_1:9")
        #expect(keys.passiveDecision("o", "d") == "wechat:wx1:{o}:msg:d:passive")
        #expect(WorkerKeys.userTag("a}b{c%") == "a%7Db%7Bc%25")
        #expect(WorkerKeys.userTag("a%7Db") != WorkerKeys.userTag("a}b"))
        #expect(WorkerKeys.prefixProblem("we{chat}") != nil)
        #expect(WorkerKeys.prefixProblem("wechat") == nil)
        #expect { try WorkerConfiguration(RelayEnvironment(["WECHAT_APPID": "wx1", "WECHAT_QUEUE_PREFIX": "a{b}"])) } throws: {
            ($0 as? ConfigurationError)?.variable == "WECHAT_QUEUE_PREFIX"
        }
        #expect { try TokendConfiguration(RelayEnvironment(["WECHAT_APPID": "wx1", "WECHAT_SECRET": "s", "TOKEND_SECRET": "t", "WECHAT_QUEUE_PREFIX": "a{b}"])) } throws: {
            ($0 as? ConfigurationError)?.variable == "WECHAT_QUEUE_PREFIX"
        }
    }

    /// An OpenID with braces (a forged push in plaintext mode) still keeps all its keys in one
    /// slot: processed, not refused with CROSSSLOT.
    @Test func anOpenIDWithBracesStaysInOneSlot() async throws {
        let cluster = try await PrivateRedis(cluster: true)
        defer { cluster.stop() }
        let redis = RedisPool(configuration: try RedisConfiguration(url: cluster.url), size: 1, logger: workerLogger)
        defer { redis.close() }
        let store = SessionStore(redis: redis, appID: "wxcluster", prefix: "cl")
        let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "x", eventKey: nil, from: "o}x{y", to: "gh", msgID: 3))
        let fence = try await store.takeFence(shard: 0)
        #expect(try await store.observe(m, now: 1, fence: fence).isNew)
        #expect(try await store.claim(m, worker: "a", fence: fence, lease: .seconds(30)) == .claimed)
        #expect(try await store.markReplied(m, sent: true) == 1)
    }

    /// `wechat-worker migrate-keys`: old sessions move into the per-user layout with their expiry
    /// and go on counting; a session the new layout already has stays; the old fences go; a
    /// second run moves nothing.
    @Test func theMigrationMovesSessionsAndDropsOldFences() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 1, logger: workerLogger)
        defer { redis.close() }
        let prefix = TestServices.unique("mig")
        let store = SessionStore(redis: redis, appID: "wxmig", prefix: prefix)
        _ = try await redis.send(["HSET", .init("\(prefix):wxmig:session:oOld"), "messages", "4", "first_seen", "1", "subscribed", "1", "state", "menu"])
        _ = try await redis.send(["EXPIRE", .init("\(prefix):wxmig:session:oOld"), "1000"])
        _ = try await redis.send(["HSET", .init("\(prefix):wxmig:session:oBoth"), "messages", "9"])
        _ = try await redis.send(["HSET", .init(store.keys.session("oBoth")), "messages", "1"])
        _ = try await redis.send(["SET", .init("\(prefix):fence:3"), "17"])
        _ = try await redis.send(["SET", .init("\(prefix):wxmig:session"), "not a session"])

        let report = try await KeyLayoutMigration(redis: redis, prefix: prefix).run()
        #expect(report == KeyLayoutMigration.Report(moved: 1, kept: 1, unrecognized: 0, fencesDeleted: 1))
        #expect(try await redis.send(["EXISTS", .init("\(prefix):wxmig:session:oOld")]).int == 0)
        #expect(try await redis.send(["EXISTS", .init("\(prefix):fence:3")]).int == 0)
        let ttl = try #require(try await redis.send(["TTL", .init(store.keys.session("oOld"))]).int)
        #expect(ttl > 0 && ttl <= 1000)
        #expect(try await store.session("oBoth").messages == 1, "the newer session stays")
        let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "x", eventKey: nil, from: "oOld", to: "gh", msgID: 5))
        let seen = try await store.observe(m, now: 10, fence: try await store.takeFence(shard: 0))
        #expect(seen.snapshot.messages == 5 && seen.snapshot.state == "menu")
        #expect(try await KeyLayoutMigration(redis: redis, prefix: prefix).run().moved == 0)
    }
}
