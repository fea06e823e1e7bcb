import AMQP
import AsyncHTTPClient
import Foundation
import Glibc
import Redis
import RelayContract
import Simulator
import TestSupport
import Testing
import TokenClient
import WeChat
import Worker

/// #16: at most one sender per message (claims and fences), per-user order through retries,
/// and the uncertain send, with real RabbitMQ, Redis and worker processes.
@Suite("Delivery guarantees", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct DeliveryGuaranteeTests {
    /// A retried message holds its user's place: the first send fails (-1), and the user's
    /// later messages are answered after it, in order, with the session in the same order
    /// ("1" in the menu counts three messages). Before, the retry went to the back of the shard.
    @Test func aRetryHoldsItsUsersPlace() async throws {
        try await withStack(quota: 100) { s in
            let w = try await s.worker(retryDelays: [.milliseconds(300), .milliseconds(300), .milliseconds(300)])
            try await running([w]) {
                await w.waitUntilOwning(s.topology.shardCount)
                var faults = FakePlatform.Faults()
                faults.failNextWith = -1
                faults.failNextCount = 1
                s.platform.faults = faults
                for text in ["帮助", "菜单", "1"] { try await s.push("text", text, from: "oRetry") }
                let replies = await s.replies(to: "oRetry", count: 3)
                #expect(replies == [help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息"])
                #expect(retried(w) == 1)
            }
        }
    }

    /// A hand-over while a user's first message waits for its retry and the second waits behind
    /// it: both go back to the queue, in order, for the next worker. (Found by the chaos run:
    /// the waiting retry was given back, and the second message, already in hand, was then sent
    /// by the old worker before the next one sent the first.)
    @Test func aHandOverGivesARetryAndWhatWaitsBehindItBackInOrder() async throws {
        try await withStack(quota: 100, shards: 8) { s in
            let timing: (Duration, Duration) = (.milliseconds(200), .seconds(1))
            let a = try await s.worker(retryDelays: [.seconds(10), .seconds(10), .seconds(10)], membership: timing)
            let b = try await s.worker(retryDelays: [.seconds(10), .seconds(10), .seconds(10)], membership: timing)
            // One user per shard, so that whichever shards move, some users move with them.
            var users: [Int: String] = [:]
            for i in 0..<2000 where users.count < s.topology.shardCount {
                let u = "oMove\(i)"
                if users[s.topology.shard(appID: s.appID, openID: u)] == nil { users[s.topology.shard(appID: s.appID, openID: u)] = u }
            }
            try await running([a]) {
                await a.waitUntilOwning(s.topology.shardCount)
                var faults = FakePlatform.Faults()
                faults.failNextWith = -1
                faults.failNextCount = users.count  // every user's first send fails once, then waits 10 s
                s.platform.faults = faults
                for u in users.values {
                    try await s.push("text", "帮助", from: u)
                    try await s.push("text", "菜单", from: u)
                }
                try await eventually("every first send failed") { retried(a) >= users.count }
                try await running([b]) {
                    try await eventually("the shards are split") { !b.ownedShards.isEmpty && a.ownedShards.count < s.topology.shardCount }
                    for u in users.values {
                        #expect(await s.replies(to: u, count: 2) == [help, "功能列表\n1 我的消息数\n2 退出菜单"], "\(u)")
                    }
                }
            }
        }
    }

    /// After its retries run out a message is dead-lettered, marked as skipped, and the
    /// user's later messages go on.
    @Test func aMessageOutOfRetriesIsSkippedAndMarked() async throws {
        try await withStack(quota: 100) { s in
            let delays: [Duration] = [.milliseconds(100), .milliseconds(100)]
            let w = try await s.worker(retryDelays: delays)
            try await running([w]) {
                await w.waitUntilOwning(s.topology.shardCount)
                var faults = FakePlatform.Faults()
                faults.failNextWith = -1
                faults.failNextCount = 1 + delays.count
                s.platform.faults = faults
                try await s.push("text", "帮助", from: "oSkip")
                try await s.push("text", "菜单", from: "oSkip")
                #expect(await s.replies(to: "oSkip", count: 1) == ["功能列表\n1 我的消息数\n2 退出菜单"])
                let dead = try #require(try await s.pusher.get(queue: s.topology.deadLetterQueue))
                #expect(dead.message.properties.headers[WorkerHeader.order]?.stringValue == "skipped")
                #expect(dead.message.bodyString?.contains("帮助") == true)
                try dead.ack()
            }
        }
    }

    /// The last check before a request goes out: a claim grown too old (a pause after it was
    /// taken) sends nothing.
    @Test func aClaimTooOldSendsNothing() async throws {
        try await withStack(quota: 100) { s in
            let tokens = TokenClient(redis: s.redis, keys: TokenKeys(appID: s.appID, prefix: s.topology.prefix), tokendURL: s.tokendURL, tokendSecret: "bearer")
            let sender = Sender(apiURL: s.apiURL, http: .shared, tokens: tokens)
            s.platform.userPushed(openID: "oOld", msgType: "text", event: nil)
            let outcome = await sender.send(.text(to: "oOld", "late")) { false }
            guard case .retryLater = outcome else {
                Issue.record("expected a certain failure, got \(outcome)")
                return
            }
            #expect(s.platform.sendCalls == 0)
            #expect(await sender.send(.text(to: "oOld", "in time")) { true } == .sent)
            #expect(s.platform.sendCalls == 1)
        }
    }

    /// Commit and commit-and-claim: the first decision stored wins, whichever script stored it,
    /// and commit-and-claim claims as the claim script does (also when it loses the commit).
    @Test func theFirstCommittedDecisionWinsInBothScripts() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 2, logger: workerLogger)
        defer { redis.close() }
        let store = SessionStore(redis: redis, appID: "wxd\(UInt32.random(in: 0 ... .max))", prefix: TestServices.unique("commit"))
        let fence = try await store.takeFence(shard: 1)
        let first = ReplyRules.Decision(reply: CustomerServiceMessage(toUser: "oCommit", content: .text(content: "first")), setState: "menu")
        let second = ReplyRules.Decision(reply: CustomerServiceMessage(toUser: "oCommit", content: .text(content: "second")), setState: nil)
        // commit first, then commit-and-claim: the claim is taken, the first decision returned.
        let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "1", eventKey: nil, from: "oCommit", to: "gh", msgID: 7))
        _ = try await store.observe(m, now: 1, fence: fence)
        #expect(try await store.commit(first, for: m) == first)
        let (stored, claim) = try await store.commitAndClaim(second, for: m, worker: "a", fence: fence, lease: .seconds(30))
        #expect(stored == first && claim == .claimed)
        #expect(try await store.session("oCommit").state == "menu")
        // commit-and-claim first, then commit: the first decision stays; a second claimant waits.
        let n = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "2", eventKey: nil, from: "oCommit", to: "gh", msgID: 8))
        _ = try await store.observe(n, now: 2, fence: fence)
        #expect(try await store.commitAndClaim(first, for: n, worker: "a", fence: fence, lease: .seconds(30)) == (first, .claimed))
        #expect(try await store.commit(second, for: n) == first)
        guard case .busy = try await store.commitAndClaim(second, for: n, worker: "b", fence: fence, lease: .seconds(30)).1 else {
            Issue.record("a second claimant must wait")
            return
        }
    }

    /// The claim and the fence in Redis: one claimant at a time, a lease that runs out into
    /// "uncertain", a released claim that does not, a finished message, a raised fence.
    @Test func claimsAndFences() async throws {
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 2, logger: workerLogger)
        defer { redis.close() }
        let store = SessionStore(redis: redis, appID: "wxc\(UInt32.random(in: 0 ... .max))", prefix: TestServices.unique("fence"))
        let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oClaim", to: "gh", msgID: 42))
        let mine = try await store.takeFence(shard: 3)
        _ = try await store.observe(m, now: 1, fence: mine)
        #expect(try await store.claim(m, worker: "a", fence: mine, lease: .seconds(30)) == .claimed)
        guard case .busy = try await store.claim(m, worker: "b", fence: mine, lease: .seconds(30)) else {
            Issue.record("a second claimant must wait")
            return
        }
        try await store.releaseClaim(m, worker: "b")  // not b's: stays a's
        guard case .busy = try await store.claim(m, worker: "b", fence: mine, lease: .seconds(30)) else {
            Issue.record("only the owner releases a claim")
            return
        }
        try await store.releaseClaim(m, worker: "a")  // a's send certainly failed
        #expect(try await store.claim(m, worker: "b", fence: mine, lease: .milliseconds(50)) == .claimed)
        // b's lease runs out (Redis's clock) without b recording a send: b may have sent it.
        var afterLease = SessionStore.Claim.claimed
        try await eventually("b's lease runs out") {
            afterLease = try await store.claim(m, worker: "c", fence: mine, lease: .seconds(30))
            if case .busy = afterLease { return false }
            return true
        }
        #expect(afterLease == .uncertain)
        // Another worker becomes the shard's consumer. Until its token acts on this user, ours
        // still may (ordered before its work, as if we had finished before the hand-over) …
        let theirs = try await store.takeFence(shard: 3)
        #expect(theirs.token == mine.token + 1)
        #expect(try await store.claim(m, worker: "c", fence: mine, lease: .seconds(30)) == .claimed)
        // … and once it has (any script of the user's: here its observe of the message), ours is stale for the user.
        #expect(try await store.observe(m, now: 2, fence: theirs).fenced == false)
        #expect(try await store.claim(m, worker: "c", fence: mine, lease: .seconds(30)) == .fenced)
        let later = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "菜单", eventKey: nil, from: "oClaim", to: "gh", msgID: 43))
        #expect(try await store.observe(later, now: 2, fence: mine).fenced)
        #expect(try await store.session("oClaim").messages == 1, "a fenced observe changes nothing")
        // Another user of the shard: our token is not stale for them until theirs acts on them.
        let other = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "菜单", eventKey: nil, from: "oClaimOther", to: "gh", msgID: 44))
        #expect(try await store.observe(other, now: 3, fence: theirs).fenced == false)
        #expect(try await store.observe(other, now: 3, fence: mine).fenced)
        #expect(try await store.claim(other, worker: "c", fence: mine, lease: .seconds(30)) == .fenced)
        // The copy is in the user's session hash (the user's slot), not in what rules and handlers see.
        #expect(try await redis.send(["HGET", .init(store.keys.session("oClaimOther")), "fence"]).text == "\(theirs.token)")
        #expect(try await store.session("oClaimOther").values["fence"] == nil)
        #expect(try await store.observe(other, now: 4, fence: theirs).snapshot.values["fence"] == nil)
        // A stale token commits nothing either: no decision, no dialog state.
        let stale = ReplyRules.Decision(reply: nil, setState: "menu")
        await #expect(throws: SessionStore.FencedOut.self) { try await store.commit(stale, for: other, fence: mine) }
        #expect(try await store.session("oClaimOther").state == nil)
        let staleSend = ReplyRules.Decision(reply: CustomerServiceMessage(toUser: "oClaimOther", content: .text(content: "x")), setState: "menu")
        #expect(try await store.commitAndClaim(staleSend, for: other, worker: "c", fence: mine, lease: .seconds(30)).1 == .fenced)
        #expect(try await store.session("oClaimOther").state == nil)
        try await store.releaseClaim(m, worker: "c")
        #expect(try await store.claim(m, worker: "d", fence: theirs, lease: .seconds(30)) == .claimed)
        try await store.markReplied(m, sent: true)
        #expect(try await store.claim(m, worker: "e", fence: theirs, lease: .seconds(30)) == .finished)
    }

    /// #18: under Sentinel, a claim counts only once a replica has it (`WAIT`): with both
    /// replicas stopped the claim is a retriable error (the worker waits as in a Redis outage
    /// and sends nothing), so a failover right after it cannot lose the only copy and let
    /// another worker send the reply a second time; the same for the finished mark. With the
    /// replica back, the mark written again is acknowledged.
    @Test func aClaimNoSentinelReplicaAcknowledgedIsNotSentOn() async throws {
        try await PrivateServices.with(sentinel: true) { services in
            var configuration = try RedisConfiguration(url: services.redisURL + "?wait_timeout=300")
            configuration.commandTimeout = .seconds(5)
            let redis = RedisPool(configuration: configuration, size: 2, logger: workerLogger)
            defer { redis.close() }
            let store = SessionStore(redis: redis, appID: "wxs\(UInt32.random(in: 0 ... .max))", prefix: TestServices.unique("wait"))
            let m = try InboundMessage(xml: PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oWait", to: "gh", msgID: 9))
            let fence = try await store.takeFence(shard: 1)
            _ = try await store.observe(m, now: 1, fence: fence)
            try await services.stopRedis(instance: 2)
            try await services.stopRedis(instance: 3)
            await #expect { try await store.claim(m, worker: "a", fence: fence, lease: .seconds(30)) } throws: { error in
                guard let e = error as? RedisError else { return false }
                return e.isRetriable && e.message.contains("replica")
            }
            // The fresh claim no replica acknowledged was given back: left in place, it would
            // expire during a long outage and read as an uncertain send (a false "maybe sent").
            #expect(try await redis.send(["HGET", .init(store.keys.record(m.fromUserName, m.dedupID)), "claim"]) == .null)
            await #expect { try await store.markReplied(m, sent: true) } throws: { ($0 as? RedisError)?.isRetriable == true }
            try await services.startRedis(instance: 2)
            // The mark is written again until a replica acknowledges it (as the worker's markSent does).
            try await eventually("the replica to be back in sync", within: 30) { (try? await store.markReplied(m, sent: true)) != nil }
            #expect(try await store.claim(m, worker: "b", fence: fence, lease: .seconds(30)) == .finished)
        }
    }

    /// A gateway answers 502/504 after WeChat carried the send out: that send is uncertain,
    /// not a certain failure, so under `WORKER_UNCERTAIN_SEND=skip` it is not sent again (a 504
    /// was read as "not sent", and the retry sent the reply a second time).
    @Test func aGatewayTimeoutAfterTheSendIsUncertain() async throws {
        try await withStack(quota: 100) { s in
            let w = try await s.worker(uncertainSend: .skip)
            var faults = FakePlatform.Faults()
            faults.gatewayErrorsAfterSend = 1
            s.platform.faults = faults
            let user = "oGateway"
            try await running([w]) {
                try await s.push("text", "帮助", from: user)
                try await s.push("text", "菜单", from: user)
                _ = await s.platform.waitForMessages(touser: user, count: 2)
                try await eventually("both messages are settled") { metric(w, #"wechat_worker_messages_total{outcome="replied"} "#) >= 1 && metric(w, #"wechat_worker_messages_total{outcome="uncertain"} "#) >= 1 }
            }
            let replies = s.platform.messages(touser: user).map { $0.content ?? "" }
            #expect(replies == [help, "功能列表\n1 我的消息数\n2 退出菜单"])
            #expect(metric(w, #"wechat_worker_messages_total{outcome="uncertain"} "#) == 1)
            s.platform.faults = FakePlatform.Faults()
        }
    }

    /// A real `wechat-worker` is paused (SIGSTOP) past the broker's heartbeat with a send in
    /// flight and the user's next messages in hand; another worker stands by and takes over;
    /// then the paused one is resumed (SIGCONT). Every message is answered once and in order:
    /// the one whose request had reached the API is "uncertain" (its sender stopped before
    /// recording it) and, under `WORKER_UNCERTAIN_SEND=skip`, not sent again; the resumed
    /// worker sends nothing (its deliveries are stale, its fence too).
    @Test(.enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI))
    func aPausedWorkerThatWakesUpSendsNothing() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        try await withStack(quota: 100) { s in
            let port = try freePort()
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("paused-worker-\(UUID().uuidString).log").path
            let a = try ChildProcess(
                "\(bin)/wechat-worker",
                environment: [
                    "WECHAT_APPID": s.appID, "AMQP_URL": try TestServices.amqpURL() + "?heartbeat=2", "REDIS_URL": try TestServices.redisURL(),
                    "WECHAT_API_URL": s.apiURL, "TOKEND_URL": s.tokendURL, "TOKEND_SECRET": "bearer",
                    "WECHAT_QUEUE_PREFIX": s.topology.prefix, "METRICS_PORT": String(port), "WORKER_CLAIM_LEASE": "2",
                    "WORKER_CONCURRENCY": "4", "LOG_LEVEL": "info",
                ], logPath: log)
            defer {
                a.signal(SIGCONT)
                a.kill()
            }
            func ready() async -> Bool {
                guard let r = try? await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port)/readyz"), timeout: .seconds(1)) else { return false }
                return r.status == .ok
            }
            try await eventually("the worker process consumes", within: 60) { await ready() }
            let user = "oPaused"
            s.platform.hold(touser: user)
            try await s.push("text", "帮助", from: user)
            try await eventually("its send reached the API") { s.platform.heldCount(touser: user) >= 1 }
            try await s.push("text", "菜单", from: user)
            try await s.push("text", "1", from: user)
            a.signal(SIGSTOP)
            // WeChat takes the paused worker's request (it was already at the API).
            s.platform.release(touser: user)
            _ = await s.platform.waitForMessages(touser: user, count: 1)
            let b = try await s.worker(membership: (.milliseconds(200), .seconds(1)), uncertainSend: .skip)
            try await running([b]) {
                // B takes the shards once A's membership lapses and becomes their active consumer
                // once the broker drops A's connection (heartbeat 2 s).
                try await eventually("the other worker answers the rest", within: 60) { s.platform.count(touser: user) >= 3 }
                a.signal(SIGCONT)
                try await eventually("the resumed worker is back", within: 60) { await ready() }
                try await s.push("text", "2", from: user)
                try await eventually("the next message is answered", within: 60) { s.platform.count(touser: user) >= 4 }
                #expect(metric(b, #"wechat_worker_messages_total{outcome="uncertain"} "#) == 1)
            }
            let replies = s.platform.messages(touser: user).map { $0.content ?? "" }
            #expect(replies == [help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息", "已退出菜单"], "log of the paused worker: \(log)")
            // Its 2 s lease is below what a 5 s send needs: said at start.
            // (And the log handler writes the logger's and the line's metadata.)
            let warning = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
                .first { $0.contains("WORKER_CLAIM_LEASE is 10 s or less") }
            #expect(warning?.contains("wechat.appid=\(s.appID)") == true && warning?.contains("worker.claim_lease=2") == true, "\(warning ?? "no warning")")
        }
    }
}
