import AMQP
import AsyncHTTPClient
import NIOCore
import RelayCore
import ServiceLifecycle
import Simulator
import TestSupport
import Testing
import Worker

@Suite("Worker across a broken broker connection", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct WorkerConnectionLossTests {
    /// The consuming connection breaks while a reply is being sent. The send completes, its ack
    /// finds the connection gone: that is not a processing failure (no copy goes to a delay
    /// queue); the broker redelivers the original, which finds the reply recorded.
    @Test func aConnectionBrokenMidSendIsNotARetry() async throws {
        try await withSlowSendsAndACuttableConnection(concurrency: 16) { s, proxy, w in
            s.platform.hold(touser: "u1")
            try await s.push("text", "hello", from: "u1")
            try await eventually("the send reached the API") { s.platform.heldCount(touser: "u1") >= 1 }
            proxy.cutAll()
            s.platform.release(touser: "u1")
            #expect(await s.replies(to: "u1", count: 1).count == 1)
            try await eventually("the redelivery dropped as a duplicate") { duplicates(w) >= 1 }
            #expect(retried(w) == 0)
            #expect(s.platform.messages(touser: "u1").count == 1)
        }
    }
}

extension WorkerConnectionLossTests {
    /// A stack and a running worker whose consuming connection goes through a proxy the test
    /// can cut; `body` runs once it owns both shards. Tests hold a user's sends in flight at the
    /// fake API (``FakePlatform/hold(touser:)``) for as long as they need, inside the sender's
    /// timeout (raised to 60 s here, so that a slow machine cannot turn the hold into a retry).
    func withSlowSendsAndACuttableConnection(
        concurrency: Int, _ body: @escaping @Sendable (Stack, AMQPProxy, Worker) async throws -> Void
    ) async throws {
        try await withStack(quota: 100) { s in
            let proxy = try AMQPProxy(targetPort: AMQPConfiguration(url: TestServices.amqpURL()).port)
            defer { proxy.stop() }
            let w = try await s.worker(concurrency: concurrency, consumingURL: proxy.url, sendTimeout: .seconds(60))
            try await running([w]) {
                await w.waitUntilOwning(2)
                try await body(s, proxy, w)
            }
        }
    }

    /// Deliveries waiting for a permit when the consuming connection breaks are not processed
    /// when their turn comes: the broker has them back, and the redeliveries are answered
    /// (once each) instead.
    @Test func deliveriesThatWentStaleWhileQueuedAreNotProcessed() async throws {
        try await withSlowSendsAndACuttableConnection(concurrency: 1) { s, proxy, w in
            s.platform.hold(touser: "first")
            try await s.push("text", "帮助", from: "first")
            try await eventually("the first send reached the API") { s.platform.heldCount(touser: "first") >= 1 }
            // A user of the other shard: its delivery comes (prefetch 1 per shard) and waits
            // for the one permit while the first send is held.
            let first = s.topology.shard(appID: s.appID, openID: "first")
            let other = try #require((0..<100).map { "other-\($0)" }.first { s.topology.shard(appID: s.appID, openID: $0) != first })
            try await s.push("text", "帮助", from: other)
            try await eventually("both delivered to the worker") {
                var ready = 0
                for n in 0..<s.topology.shardCount { ready += try await s.pusher.queueInfo(s.topology.shardQueue(n)).messageCount }
                return ready == 0
            }
            proxy.cutAll()
            s.platform.release(touser: "first")
            for u in ["first", other] { #expect(await s.replies(to: u, count: 1).count == 1) }
            // Only the first (in flight during the break) comes back as a duplicate; the
            // queued one was skipped, and its redelivery was its first processing.
            try await eventually("the first one's redelivery dropped") { duplicates(w) >= 1 }
            #expect(duplicates(w) == 1)
            for u in ["first", other] { #expect(s.platform.messages(touser: u).count == 1) }
        }
    }
}

/// A memory alarm on a broker of the test's own while the worker must publish a retry.
@Suite("Worker under a broker memory alarm", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct WorkerFlowControlTests {
    /// The retry's publish is refused (the publishing connection is blocked), but the acks of
    /// every other message go out on the consuming connection, which the broker never blocks:
    /// with one connection for both, the blocked publish held every ack behind it.
    @Test func aRetryDuringAnAlarmDoesNotHoldTheAcks() async throws {
        try await PrivateServices.with { services in
            try await withStack(quota: 100, amqpURL: services.amqpURL) { s in
                let users = (0..<20).map { "alarm-user-\($0)" }
                for u in users { try await s.push("text", "hello", from: u) }
                var faults = FakePlatform.Faults()
                faults.failNextWith = -1
                faults.failNextCount = 2  // the first sends fail: a retry must be published
                s.platform.faults = faults
                try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0"])
                // One message at a time, so that most acks come after the retry's publish.
                let w = try await s.worker(concurrency: 1)
                try await running([w]) {
                    // Replies to the others, and their acks reach the broker, during the alarm.
                    try await eventually("the other users answered during the alarm", within: 90) {
                        Set(s.platform.messages().compactMap(\.touser)).count >= users.count - 2
                    }
                    try await eventually("their acks processed by the broker during the alarm", within: 60) {
                        try await messagesInShardQueues(services, s) <= 2
                    }
                    try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0.4"])
                    try await eventually("every user answered after the alarm") {
                        Set(s.platform.messages().compactMap(\.touser)) == Set(users)
                    }
                }
            }
        }
    }

    /// Ready plus unacknowledged messages in the stack's shard queues (`rabbitmqctl list_queues`).
    func messagesInShardQueues(_ services: PrivateServices, _ s: Stack) async throws -> Int {
        let out = try await services.rabbitmqctl(["list_queues", "-q", "--no-table-headers", "name", "messages"])
        let shards = Set((0..<s.topology.shardCount).map(s.topology.shardQueue))
        return out.split(separator: "\n").reduce(0) { sum, line in
            let cols = line.split(whereSeparator: { $0 == "\t" || $0 == " " })
            guard cols.count == 2, shards.contains(String(cols[0])), let n = Int(cols[1]) else { return sum }
            return sum + n
        }
    }
}

/// `wechat-worker run` as `main` assembles it (``buildWorker``): configured from the
/// environment, its two connections, Redis, the worker and its HTTP endpoints in one group.
@Suite("Worker assembly", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct WorkerAssemblyTests {
    @Test func theAssembledWorkerRepliesAndReportsReady() async throws {
        try await withStack(quota: 100, shards: 8) { s in
            let port = try freePort()
            let configuration = try WorkerConfiguration(RelayEnvironment([
                "WECHAT_APPID": s.appID, "AMQP_URL": s.amqpURL, "REDIS_URL": try TestServices.redisURL(),
                "WECHAT_API_URL": s.apiURL, "TOKEND_URL": s.tokendURL, "TOKEND_SECRET": "bearer",
                "WECHAT_QUEUE_PREFIX": s.topology.prefix, "METRICS_PORT": String(port),
            ]))
            let app = try buildWorker(configuration: configuration, metrics: WorkerMetrics(), logger: workerLogger)
            #expect(app.worker.amqp !== app.worker.publisher)
            let group = ServiceGroup(configuration: .init(services: app.services.map { .init(service: $0) }, logger: workerLogger))
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                defer { tasks.cancelAll() }
                try await s.push("text", "帮助", from: "assembled")
                #expect(await s.replies(to: "assembled", count: 1) == ["您好!输入“菜单”查看功能列表"])
                let http = HTTPClient(eventLoopGroupProvider: .singleton)
                func get(_ path: String) async throws -> (Int, String) {
                    let r = try await http.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)"), timeout: .seconds(5))
                    return (Int(r.status.code), String(buffer: try await r.body.collect(upTo: 1 << 20)))
                }
                try await eventually("ready") { (try? await get("/readyz"))?.0 == 200 }
                #expect(try await get("/healthz").0 == 200)
                #expect(try await get("/metrics").1.contains(#"wechat_worker_messages_total{outcome="replied"} 1"#))
                try await http.shutdown()
                await group.triggerGracefulShutdown()
                try await tasks.next()
            }
        }
    }
}
