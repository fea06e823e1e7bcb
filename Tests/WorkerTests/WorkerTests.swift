import AMQP
import Foundation
import Hummingbird
import Ingress
import HummingbirdTesting
import Logging
import Redis
import RelayCore
import ServiceLifecycle
import Simulator
import TestSupport
import Testing
import TokenClient
import Tokend
import WeChat
import Worker
import RelayContract

let workerLogger: Logger = {
    var l = Logger(label: "worker-test")
    l.logLevel = ProcessInfo.processInfo.environment["WR_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
    return l
}()

/// RabbitMQ, Redis, the fake API and tokend (both on live ports), with names of their own.
struct Stack: Sendable {
    let platform: FakePlatform
    /// The toy decision service at `apiURL/sim/decide`.
    let decider: ToyDecider
    let apiURL: String
    let tokendURL: String
    let appID: String
    let topology: WeChatTopology
    let pusher: AMQPConnection
    let redis: RedisPool
    /// The broker (the shared test broker unless `withStack` was given another).
    let amqpURL: String

    /// A worker with its own broker connection (as a separate process would have).
    /// - Parameters:
    ///   - sessions: a Redis for the sessions and message records other than the stack's (a private one a test can stop).
    ///   - retryDelays: the delay queues' delays (short ones for tests that go through them all).
    ///   - consumingURL: the broker address of the consuming connection (a proxy a test can cut).
    func worker(
        rules: ReplyRules? = nil, concurrency: Int = 16, sessions: RedisPool? = nil,
        retryDelays: [Duration] = RetryTopology.defaultDelays, membership: (interval: Duration, ttl: Duration)? = nil,
        consumingURL: String? = nil, sendTimeout: Duration = .seconds(5), uncertainSend: UncertainSend = .resend,
        claimLease: Duration = .seconds(30), decideTimeout: Duration? = nil, decideURL: String? = nil,
        handlers: [any MessageHandler] = [], replyMode: ReplyMode = .customerService
    ) async throws -> Worker {
        var config = try AMQPConfiguration(url: consumingURL ?? amqpURL, connectionName: "worker-test")
        config.maxReconnectDelay = .milliseconds(300)
        let amqp = try await AMQPConnection.connect(configuration: config, topology: topology.inbound, logger: workerLogger)
        var publishing = try AMQPConfiguration(url: amqpURL, connectionName: "worker-test-publish")
        publishing.maxReconnectDelay = .milliseconds(300)
        let publisher = try await AMQPConnection.connect(configuration: publishing, logger: workerLogger)
        let tokens = TokenClient(redis: redis, keys: TokenKeys(appID: appID, prefix: topology.prefix), tokendURL: tokendURL, tokendSecret: "bearer", cacheFor: .milliseconds(100))
        let worker = Worker(
            amqp: amqp, publisher: publisher, store: SessionStore(redis: sessions ?? redis, appID: appID, prefix: topology.prefix), sender: Sender(apiURL: apiURL, http: .shared, tokens: tokens, timeout: sendTimeout),
            // With a decision service and no rules given, the service decides everything (as WORKER_DECIDE_URL without WORKER_RULES).
            rules: rules ?? (decideTimeout == nil ? .defaults : ReplyRules(rules: [])), handlers: handlers,
            decisionService: decideTimeout.map { DecisionService(url: decideURL ?? (apiURL + "/sim/decide"), http: .shared, timeout: $0, appID: appID) },
            topology: topology, concurrency: concurrency, metrics: WorkerMetrics(), logger: workerLogger,
            retryDelays: retryDelays, uncertainSend: uncertainSend, claimLease: claimLease, replyMode: replyMode)
        if let membership { worker.membershipTiming = membership }
        return worker
    }

    /// Publishes a push as the ingress would, after telling the fake platform (which opens the window).
    @discardableResult
    func push(_ kind: String, _ value: String? = nil, key: String? = nil, from user: String, msgID: UInt64? = nil) async throws -> InboundMessage {
        let xml = try PushBuilder.xml(
            kind: kind, value: value, eventKey: key, from: user, to: "gh_test", msgID: msgID ?? UInt64.random(in: 1...UInt64(Int64.max)))
        let m = try InboundMessage(xml: xml)
        platform.userPushed(openID: user, msgType: m.msgType, event: m.event)
        try await publish(xml: xml, message: m)
        return m
    }

    func publish(xml: String, message m: InboundMessage, extraHeaders: AMQPTable = [:]) async throws {
        var headers: AMQPTable = [WeChatTopology.Header.openID: .string(m.fromUserName), WeChatTopology.Header.msgType: .string(m.msgType),
            WeChatTopology.Header.receivedAtMs: .int(Int64(Date().timeIntervalSince1970 * 1000))]
        headers.merge(extraHeaders) { $1 }
        if let e = m.event { headers[WeChatTopology.Header.event] = .string(e) }
        try await pusher.publish(
            AMQPMessage(xml, properties: AMQPProperties(contentType: "application/xml", headers: headers, messageID: m.dedupID)),
            exchange: topology.inboundExchange, routingKey: topology.routingKey(appID: appID, openID: m.fromUserName))
    }

    /// The text replies a user got, in order, once there are `count`.
    func replies(to user: String, count: Int) async -> [String] {
        await platform.waitForMessages(touser: user, count: count).map { $0.content ?? $0.msgtype }
    }

    var deadLetters: DeadLetterTool { DeadLetterTool(amqp: pusher, topology: topology) }
}

/// - Parameter amqpURL: a broker other than the shared test broker (a private one a test may disturb).
func withStack(
    quota: Int = 5, shards: Int = 2, amqpURL: String? = nil, _ body: @escaping @Sendable (Stack) async throws -> Void
) async throws {
    let amqpURL = try amqpURL ?? TestServices.amqpURL()
    let appID = "wxw\(UInt32.random(in: 0 ... .max))"
    var settings = FakePlatform.Settings(appID: appID, secret: "s3cret")
    settings.messageQuota = quota
    let platform = FakePlatform(settings: settings)
    let decider = ToyDecider()
    let api = Application(
        router: FakeAPI(platform: platform, decider: decider, logger: workerLogger).router(), configuration: .init(address: .hostname("127.0.0.1", port: 0)),
        logger: workerLogger)
    try await api.test(.live) { apiClient in
        let apiURL = "http://127.0.0.1:\(try #require(apiClient.port))"
        let redis = RedisPool(configuration: try RedisConfiguration(url: TestServices.redisURL()), size: 16, logger: workerLogger)
        let prefix = TestServices.unique("worker")
        let tokendConfig = try TokendConfiguration(RelayEnvironment([
            "WECHAT_APPID": appID, "WECHAT_SECRET": "s3cret", "TOKEND_SECRET": "bearer", "REDIS_URL": try TestServices.redisURL(),
            "WECHAT_API_URL": apiURL, "WECHAT_QUEUE_PREFIX": prefix,
        ]))
        let tokend = Tokend(configuration: tokendConfig, redis: redis, logger: workerLogger)
        _ = try await tokend.accessToken.refresh(.missing)
        let tokendApp = Application(router: buildTokendRouter(tokend), configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: workerLogger)
        try await tokendApp.test(.live) { tokendClient in
            let topology = WeChatTopology(prefix: prefix, shardCount: shards)
            let pusher = try await AMQPConnection.connect(
                configuration: AMQPConfiguration(url: amqpURL), topology: topology.inbound, logger: workerLogger)
            let stack = Stack(
                platform: platform, decider: decider, apiURL: apiURL, tokendURL: "http://127.0.0.1:\(try #require(tokendClient.port))", appID: appID,
                topology: topology, pusher: pusher, redis: redis, amqpURL: amqpURL)
            do {
                try await body(stack)
            } catch {
                await cleanUp(stack)
                throw error
            }
            await cleanUp(stack)
        }
        redis.close()
    }
}

func cleanUp(_ s: Stack) async {
    let retry = RetryTopology(base: s.topology)
    for q in (0..<8).map(s.topology.shardQueue) + [s.topology.deadLetterQueue] + (0..<3).map(retry.queue) {
        _ = try? await s.pusher.deleteQueue(q)
    }
    for x in [s.topology.inboundExchange, s.topology.deadLetterExchange] + (0..<3).map(retry.exchange) {
        try? await s.pusher.deleteExchange(x)
    }
    await s.pusher.close()
}

/// Runs workers in a ServiceGroup while `body` runs, then shuts them down gracefully.
/// They run in the production wrapper (``WorkerService``), after their two connections.
func running(_ workers: [Worker], _ body: () async throws -> Void) async throws {
    let group = ServiceGroup(
        configuration: .init(
            services: workers.flatMap {
                [.init(service: $0.amqp), .init(service: $0.publisher), .init(service: WorkerService(worker: $0))]
            },
            logger: workerLogger))
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        do {
            try await body()
        } catch {
            await group.triggerGracefulShutdown()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
    }
}

let help = "您好!输入“菜单”查看功能列表"
let unsupported = "暂不支持该指令"

@Suite("wechat-worker", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct WorkerTests {
    @Test func everyRowOfTheDefaultRules() async throws {
        try await withStack(quota: 100) { s in
            let w = try await s.worker()
            let u = "oRules"
            try await running([w]) {
                try await s.push("text", "帮助", from: u)
                try await s.push("event", "CLICK", key: "HELP", from: u)
                try await s.push("text", "菜单", from: u)
                try await s.push("text", "1", from: u)  // 3 messages so far (events do not count)
                try await s.push("image", from: u)      // in the menu, anything else: the other rows
                try await s.push("text", "1", from: u)  // still in the menu: 5 messages
                try await s.push("text", "2", from: u)
                try await s.push("text", "1", from: u)  // out of the menu now
                try await s.push("event", "LOCATION", from: u)
                try await s.push("event", "VIEW", key: "https://x", from: u)
                try await s.push("event", "CLICK", key: "OTHER", from: u)
                try await s.push("voice", "帮助", from: u)  // Recognition counts as text
                try await s.push("event", "subscribe", from: u)
                try await s.push("link", from: u)
                let replies = await s.replies(to: u, count: 11)
                #expect(replies == [
                    help, help, "功能列表\n1 我的消息数\n2 退出菜单", "您已发送3条消息", unsupported, "您已发送5条消息", "已退出菜单",
                    unsupported, help, "感谢关注！输入“帮助”查看使用说明", unsupported,
                ])
                // Unsubscribe: no reply, the session is marked. (Awaited here: a shutdown leaves a
                // delivery not yet started in the queue, unprocessed.)
                try await s.push("event", "unsubscribe", from: u)
                let store = SessionStore(redis: s.redis, appID: s.appID, prefix: s.topology.prefix)
                try await eventually("the unsubscribe is recorded") { try await store.session(u).values["subscribed"] == "0" }
            }
            #expect(s.platform.messages(touser: u).count == 11)
            let session = try await SessionStore(redis: s.redis, appID: s.appID, prefix: s.topology.prefix).session(u)
            #expect(session.values["subscribed"] == "0")
            #expect(session.messages == 9)
        }
    }

    @Test func threePushesOfOneMessageGiveOneReplyAndCountOnce() async throws {
        try await withStack { s in
            let w = try await s.worker()
            try await running([w]) {
                for _ in 0..<3 { try await s.push("text", "菜单", from: "oDup", msgID: 42) }
                try await s.push("text", "1", from: "oDup", msgID: 43)
                let replies = await s.replies(to: "oDup", count: 2)
                #expect(replies == ["功能列表\n1 我的消息数\n2 退出菜单", "您已发送2条消息"])
            }
            #expect(s.platform.messages(touser: "oDup").count == 2)
        }
    }

    @Test func oneUsersMessagesAreAnsweredInOrderAcrossFourWorkers() async throws {
        let echo = try ReplyRules(yaml: "rules:\n  - match: { type: text }\n    reply: { text: \"{{message.Content}}\" }\n")
        try await withStack(quota: 1000) { s in
            var workers: [Worker] = []
            for _ in 0..<4 { workers.append(try await s.worker(rules: echo)) }
            try await running(workers) {
                for i in 0..<200 { try await s.push("text", "m\(i)", from: "oOrder") }
                let replies = await s.replies(to: "oOrder", count: 200)
                #expect(replies == (0..<200).map { "m\($0)" })
            }
        }
    }

    @Test func aRejectedTokenIsRefreshedAndTheReplySentOnce() async throws {
        try await withStack { s in
            let w = try await s.worker()
            var faults = FakePlatform.Faults()
            faults.failNextWith = 40001
            faults.failNextCount = 1
            s.platform.faults = faults
            let before = s.platform.tokenCalls.stableToken
            try await running([w]) {
                try await s.push("text", "帮助", from: "oToken")
                #expect(await s.replies(to: "oToken", count: 1) == [help])
            }
            #expect(s.platform.tokenCalls.stableToken == before + 1)
            #expect(s.platform.messages(touser: "oToken").count == 1)
        }
    }

    @Test func systemBusyTwiceIsRetriedThroughTheDelayQueue() async throws {
        try await withStack { s in
            let w = try await s.worker()
            var faults = FakePlatform.Faults()
            faults.failNextWith = -1
            faults.failNextCount = 2
            s.platform.faults = faults
            try await running([w]) {
                try await s.push("text", "帮助", from: "oBusy")
                #expect(await s.replies(to: "oBusy", count: 1) == [help])
            }
            #expect(s.platform.messages(touser: "oBusy").count == 1)
            #expect(s.platform.sendCalls == 3)
        }
    }

    @Test func outsideTheWindowIsNotRetried() async throws {
        try await withStack { s in
            let w = try await s.worker()
            try await running([w]) {
                // Published without telling the platform: WeChat answers 45015.
                let xml = try PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oLate", to: "gh_test")
                try await s.publish(xml: xml, message: try InboundMessage(xml: xml))
                // A user on the same shard: delivered after oLate, so oLate is in hand before the shutdown.
                let next = try #require((0..<1000).map { "oNext\($0)" }.first { s.topology.shard(appID: s.appID, openID: $0) == s.topology.shard(appID: s.appID, openID: "oLate") })
                try await s.push("text", "帮助", from: next)
                _ = await s.replies(to: next, count: 1)
            }
            #expect(s.platform.messages(touser: "oLate").isEmpty)
            // Once, not retried, and not dead-lettered.
            #expect(s.platform.sendCalls == 2)
            #expect(try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount == 0)
        }
    }

    @Test func malformedMessagesAreDeadLetteredAndCanBeReplayed() async throws {
        try await withStack { s in
            let w = try await s.worker()
            try await running([w]) {
                try await s.pusher.publish(
                    AMQPMessage("<xml><oops>", properties: AMQPProperties(headers: [WeChatTopology.Header.openID: "oBad"])),
                    exchange: s.topology.inboundExchange, routingKey: s.topology.routingKey(appID: s.appID, openID: "oBad"))
                // A good message that failed for good earlier, waiting in the dead-letter queue.
                let xml = try PushBuilder.xml(kind: "text", value: "帮助", eventKey: nil, from: "oReplay", to: "gh_test")
                let m = try InboundMessage(xml: xml)
                s.platform.userPushed(openID: "oReplay", msgType: "text", event: nil)
                try await s.pusher.publish(
                    AMQPMessage(xml, properties: AMQPProperties(headers: [WeChatTopology.Header.openID: "oReplay", WorkerHeader.reason: "errcode 45009"], messageID: m.dedupID)),
                    exchange: s.topology.deadLetterExchange, routingKey: "")
                // Wait for the malformed one to be dead-lettered (a second dead letter appears).
                while try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount < 2 { await Task.yield() }
                let listed = try await s.deadLetters.list(limit: 10)
                #expect(listed.count == 2)
                #expect(listed.contains { $0.contains("reason=malformed message") })
                #expect(listed.contains { $0.contains("errcode 45009") })
                // Listing leaves them in place; replaying sends them back to their shard.
                while try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount < 2 { await Task.yield() }
                #expect(try await s.deadLetters.replay(limit: 10) == 2)
                #expect(await s.replies(to: "oReplay", count: 1) == [help])
            }
        }
    }

    @Test func gracefulShutdownLosesNothing() async throws {
        try await withStack(quota: 1000) { s in
            let first = try await s.worker()
            var pushed: [String] = []
            try await running([first]) {
                for i in 0..<100 {
                    let user = "oShut\(i % 10)"
                    try await s.push("text", "帮助", from: user)
                    pushed.append(user)
                }
                _ = await s.platform.waitForMessages(count: 10)
            }  // shut down while most are still queued or in flight
            // A new worker finishes the rest: every message answered exactly once.
            let second = try await s.worker()
            try await running([second]) {
                _ = await s.platform.waitForMessages(count: 100)
            }
            #expect(s.platform.messages().count == 100)
            for u in Set(pushed) { #expect(s.platform.messages(touser: u).count == 10) }
        }
    }
}

@Suite("Full stack", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct FullStackTests {
    /// Redis down for longer than the three retries of a failing send: the message
    /// keeps waiting in the longest delay queue, is answered once Redis is back,
    /// and nothing is dead-lettered.
    @Test(.enabled(if: TestServices.environment["WR_SERVICES"] != nil || TestServices.isCI), .timeLimit(.minutes(6)))
    func aRedisOutageLongerThanTheRetriesDeadLettersNothing() async throws {
        try await withStack { s in
            try await PrivateServices.with { outage in
                let sessions = RedisPool(configuration: try RedisConfiguration(url: outage.redisURL), size: 4, logger: workerLogger)
                let delays: [Duration] = [.milliseconds(100), .milliseconds(200), .milliseconds(300)]
                let w = try await s.worker(sessions: sessions, retryDelays: delays)
                try await running([w]) {
                    // The shards are taken through Redis: own them before it goes away.
                    await w.waitUntilOwning(s.topology.shardCount)
                    try await outage.stopRedis()
                    try await s.push("text", "帮助", from: "oOutage")
                    // Twice as many rounds through the delay queues as a failing send may take.
                    // No event says "retried again", so read the worker's counter (bounded: 30 s).
                    for _ in 0..<600 where retried(w) < 2 * delays.count {
                        try await Task.sleep(for: .milliseconds(50))
                    }
                    try #require(retried(w) >= 2 * delays.count, "the message stopped going round (dead-lettered?)")
                    #expect(try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount == 0)
                    try await outage.startRedis()
                    #expect(await s.replies(to: "oOutage", count: 1) == ["您好!输入“菜单”查看功能列表"])
                }
                #expect(try await s.pusher.queueInfo(s.topology.deadLetterQueue).messageCount == 0)
                #expect(metric(w, #"wechat_worker_messages_total{outcome="dead_lettered"} "#) == 0)
                sessions.close()
            }
        }
    }

    @Test func theMenuDialogContinuesOnAnotherWorker() async throws {
        try await withStack { s in
            let a = try await s.worker()
            try await running([a]) {
                try await s.push("text", "菜单", from: "oDialog")
                _ = await s.replies(to: "oDialog", count: 1)
            }
            // Worker A is gone; B knows the user is in the menu, from Redis.
            let b = try await s.worker()
            try await running([b]) {
                try await s.push("text", "1", from: "oDialog")
                #expect(await s.replies(to: "oDialog", count: 2).last == "您已发送2条消息")
            }
        }
    }

    @Test func benchAgainstTheFullStackLosesAndDuplicatesNothing() async throws {
        try await withStack(quota: 1000) { s in
            // The ingress, publishing into this stack's topology.
            var env = ["WECHAT_APPID": s.appID, "WECHAT_TOKEN": "tok", "AMQP_URL": try TestServices.amqpURL()]
            env["WECHAT_AES_KEY"] = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
            var configuration = try IngressConfiguration(RelayEnvironment(env))
            configuration.topology = s.topology
            let handler = IngressHandler(configuration: configuration, amqp: s.pusher, metrics: IngressMetrics(), logger: workerLogger)
            let ingress = Application(router: buildIngressRouter(handler), configuration: .init(address: .hostname("127.0.0.1", port: 0)))
            let workers = [try await s.worker(), try await s.worker()]
            try await ingress.test(.live) { client in
                let port = try #require(client.port)
                try await running(workers) {
                    for mode in Pusher.Mode.allCases {
                        let pusher = Pusher(
                            ingressURL: "http://127.0.0.1:\(port)/wechat", appID: s.appID, token: "tok",
                            aesKey: try EncodingAESKey("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"), accountID: "gh_test", mode: mode)
                        let runner = BenchRunner(
                            settings: BenchSettings(rate: 100, duration: .seconds(2), users: 20, drainTimeout: .seconds(20)),
                            pusher: pusher, platform: s.platform, client: .shared)
                        let report = await runner.run { _ in }
                        #expect(report.accepted == 200, "\(mode)")
                        #expect(report.errors.isEmpty, "\(mode)")
                        #expect(report.lost == 0, "\(mode)")
                        #expect(report.duplicated == 0, "\(mode)")
                        #expect(report.pushToReplyMs.count == 200, "\(mode)")
                    }
                }
            }
        }
    }
}

@Suite("Worker scale-out", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct ScaleOutTests {
    @Test func workersShareTheShardsAndAHandoverKeepsOrder() async throws {
        let echo = try ReplyRules(yaml: "rules:\n  - match: { type: text }\n    reply: { text: \"{{message.Content}}\" }\n")
        try await withStack(quota: 10_000) { s in
            let a = try await s.worker(rules: echo)
            let b = try await s.worker(rules: echo)
            let users = ["oScaleA", "oScaleB"].map { base in
                (0..<1000).map { "\(base)\($0)" }.first { s.topology.shard(appID: s.appID, openID: $0) == (base == "oScaleA" ? 0 : 1) } ?? base
            }
            // Slow sends (10 ms each, one user at a time) build a backlog, so the handover happens mid-stream.
            var faults = FakePlatform.Faults()
            faults.latencyMs = 10
            s.platform.faults = faults
            try await running([a]) {
                await a.waitUntilOwning(2)  // alone: both shards
                for i in 0..<100 { for u in users { try await s.push("text", "m\(i)", from: u) } }
                try await running([b]) {
                    // B joins: one shard each, handed over while A still has a backlog.
                    await b.waitUntilOwning(1)
                    await a.waitUntilOwning(1)
                    for i in 100..<150 { for u in users { try await s.push("text", "m\(i)", from: u) } }
                    for u in users { #expect(await s.replies(to: u, count: 150) == (0..<150).map { "m\($0)" }) }
                }
            }
            // Both did work, and every message was answered exactly once, in order.
            #expect(consumed(a) > 0 && consumed(b) > 0)
            #expect(s.platform.messages().count == 300)
            #expect(s.platform.messages().count == consumed(a) + consumed(b) - duplicates(a) - duplicates(b))
        }
    }
}

func consumed(_ w: Worker) -> Int { metric(w, "wechat_worker_consumed_total ") }
func retried(_ w: Worker) -> Int { metric(w, #"wechat_worker_messages_total{outcome="retried"} "#) }
func duplicates(_ w: Worker) -> Int { metric(w, #"wechat_worker_messages_total{outcome="duplicate"} "#) }
func metric(_ w: Worker, _ prefix: String) -> Int {
    let line = w.metrics.registry.emitToString().split(separator: "\n").first { $0.hasPrefix(prefix) }
    return line.flatMap { Int(Double($0.dropFirst(prefix.count)) ?? -1) } ?? 0
}

extension Stack {
    /// A `wechat-worker` process (from `bin`) on this stack, logging to a temporary file named after `name`.
    func workerProcess(bin: String, name: String, extra: [String: String] = [:]) throws -> ChildProcess {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(UUID().uuidString).log").path
        return try ChildProcess(
            "\(bin)/wechat-worker",
            environment: [
                "WECHAT_APPID": appID, "AMQP_URL": amqpURL, "REDIS_URL": try TestServices.redisURL(),
                "WECHAT_API_URL": apiURL, "TOKEND_URL": tokendURL, "TOKEND_SECRET": "bearer",
                "WECHAT_QUEUE_PREFIX": topology.prefix, "METRICS_PORT": String(try freePort()),
                "LOG_LEVEL": "warning",
            ].merging(extra) { $1 }, logPath: log)
    }
}

@Suite("Worker crash", .enabled(if: (TestServices.amqpEnabled && TestServices.redisEnabled && TestServices.environment["WR_BIN_DIR"] != nil) || TestServices.isCI), .timeLimit(.minutes(6)))
struct WorkerCrashTests {
    @Test func aWorkerKilledMidFlightIsRedeliveredAndRepliedExactlyOnce() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        try await withStack { s in
            // Every send hangs (a dropped connection at WeChat): the worker is caught mid-flight.
            var faults = FakePlatform.Faults()
            faults.dropRate = 1
            s.platform.faults = faults
            let child = try s.workerProcess(bin: bin, name: "killed-worker")
            try await s.push("text", "帮助", from: "oCrash")
            await s.platform.waitForArrivals(1)  // the killed worker's send is in flight now
            child.kill()
            s.platform.faults = FakePlatform.Faults()
            // Another worker takes the shards once the dead one's heartbeat expires, and gets the message again.
            let b = try await s.worker()
            try await running([b]) {
                #expect(await s.replies(to: "oCrash", count: 1) == [help])
            }
            #expect(s.platform.messages(touser: "oCrash").count == 1)
            #expect(consumed(b) >= 1)
        }
    }
}

extension WorkerCrashTests {
    /// A worker process killed while the decision service works on its message (the service
    /// answers into a dead connection: from its side it answered): nothing was stored, so the
    /// next worker asks the service again and the message is answered once — which is why the
    /// request carries `dedup_key` (docs/worker.md, "Deciding a reply").
    @Test func aWorkerKilledWhileTheServiceDecidesIsAnsweredOnceByTheNext() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        try await withStack { s in
            var faults = ToyDecider.Faults()
            faults.latencyMs = 1_500
            s.decider.faults = faults
            let child = try s.workerProcess(bin: bin, name: "killed-deciding-worker", extra: ["WORKER_DECIDE_URL": s.apiURL + "/sim/decide"])
            defer { child.kill() }
            let m = try await s.push("text", "你好", from: "oDeciding")
            try await eventually("the service to be asked") { s.decider.calls[m.dedupID] == 1 }
            child.kill()
            s.decider.faults = ToyDecider.Faults()
            let b = try await s.worker(decideTimeout: .seconds(3))
            try await running([b]) {
                #expect(await s.replies(to: "oDeciding", count: 1) == ["回声(第1句): 你好"])
            }
            // Asked again (a second time, or more if a call ran past its deadline on a busy machine).
            #expect((s.decider.calls[m.dedupID] ?? 0) >= 2)
            #expect(s.platform.messages(touser: "oDeciding").count == 1)
        }
    }
}
