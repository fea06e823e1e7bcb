import AMQP
import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import Ingress
import RelayContract
import RelayCore
import Simulator
import TestSupport
import Testing
import WeChat
import Worker

/// A handler for timing tests: text `N:X` is answered `X` after N milliseconds (N up to 5
/// digits); anything else goes on to the rules. It notes each message it starts deciding.
struct DelayedEcho: MessageHandler {
    let started = Locked<[String]>([])

    func decide(_ message: InboundMessage, session: SessionSnapshot) async throws -> ReplyRules.Decision? {
        guard case .text(let content) = message.kind, let colon = content.firstIndex(of: ":"),
            let ms = Int(content[..<colon]), ms <= 99_999
        else { return nil }
        started.withLock { $0.append(String(content[content.index(after: colon)...])) }
        try await Task.sleep(for: .milliseconds(ms))
        return .init(reply: .text(to: message.fromUserName, String(content[content.index(after: colon)...])), setState: nil)
    }
}

let passiveKey = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

/// The ingress in this process, on a live port and a broker connection of its own, waiting
/// `wait` seconds for passive replies.
struct TestIngress: Sendable {
    let handler: IngressHandler
    let amqp: AMQPConnection
    let port: Int
    let appID: String

    func pusher(_ mode: Pusher.Mode, timeout: Duration = .seconds(5), tries: Int = 3) throws -> Pusher {
        var p = Pusher(
            ingressURL: "http://127.0.0.1:\(port)/wechat", appID: appID, token: "tok", aesKey: try EncodingAESKey(passiveKey),
            accountID: "gh_test", mode: mode)
        p.timeout = timeout
        p.tries = tries
        return p
    }
}

func withIngress(
    _ s: Stack, wait: String, extra: [String: String] = [:], consumeReplies: Bool = true,
    _ body: @escaping @Sendable (TestIngress) async throws -> Void
) async throws {
    let env = [
        "WECHAT_APPID": s.appID, "WECHAT_TOKEN": "tok", "AMQP_URL": s.amqpURL, "WECHAT_AES_KEY": passiveKey, "INGRESS_REPLY_WAIT": wait,
        "WECHAT_QUEUE_PREFIX": s.topology.prefix,
    ].merging(extra) { $1 }
    var configuration = try IngressConfiguration(RelayEnvironment(env))
    configuration.topology = s.topology
    let amqp = try await AMQPConnection.connect(configuration: configuration.amqp, topology: s.topology.inbound, logger: workerLogger)
    let handler = IngressHandler(configuration: configuration, amqp: amqp, metrics: IngressMetrics(), logger: workerLogger)
    let passive = try #require(handler.passive)
    let consuming = Task { if consumeReplies { try await passive.run() } }
    if consumeReplies { try await eventually("the ingress's reply queue to be consumed") { passive.queue != nil } }
    let app = Application(router: buildIngressRouter(handler), configuration: .init(address: .hostname("127.0.0.1", port: 0)), logger: workerLogger)
    do {
        try await app.test(.live) { client in
            try await body(TestIngress(handler: handler, amqp: amqp, port: try #require(client.port), appID: s.appID))
        }
    } catch {
        consuming.cancel()
        await amqp.close()
        throw error
    }
    consuming.cancel()
    await amqp.close()
}

/// The text of a passive reply in an ingress's answer (decrypted and its signature checked
/// when encrypted, by the simulator's pusher as WeChat would), or nil for `success`.
func passiveText(_ body: String, appID: String) throws -> String? {
    let reader = Pusher(ingressURL: "", appID: appID, token: "tok", aesKey: try EncodingAESKey(passiveKey), accountID: "gh_test", mode: .safe)
    guard let root = try reader.passiveReply(in: body) else { return nil }
    #expect(root[child: "MsgType"]?.text == "text")
    #expect(root[child: "FromUserName"]?.text == "gh_test")
    return root[child: "Content"]?.text
}

func pushXML(_ content: String, from user: String, msgID: UInt64 = UInt64.random(in: 1...UInt64(Int64.max))) throws -> String {
    try PushBuilder.xml(kind: "text", value: content, eventKey: nil, from: user, to: "gh_test", msgID: msgID)
}

func workerMetric(_ w: Worker, _ name: String) -> Int { metric(w, name + " ") }

/// `INGRESS_REPLY_WAIT` and `WORKER_REPLY_MODE`: the handshake through a real ingress, real
/// workers, RabbitMQ and Redis (docs/worker.md, "Passive replies").
@Suite("Passive replies", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct PassiveReplyTests {
    /// passive-first: the reply is the HTTP response, in each of the three modes (decrypted and
    /// its signature checked; in safe mode also decrypted by wechatpy); the API is not called.
    @Test func passiveFirstAnswersInTheHTTPResponseInEveryMode() async throws {
        try await withStack { s in
            let w = try await s.worker(replyMode: .passiveFirst)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "3") { ingress in
                    for mode in Pusher.Mode.allCases {
                        let user = "oPassive\(mode.rawValue)"
                        s.platform.userPushed(openID: user, msgType: "text", event: nil)
                        let result = try await ingress.pusher(mode).push(try pushXML("帮助", from: user), openID: user)
                        #expect(result.status == 200)
                        #expect(try passiveText(result.body, appID: s.appID) == help, "\(mode)")
                        if mode == .safe, let python = TestServices.environment["WECHATPY_PYTHON"] {
                            #expect(try await wechatpyDecrypts(result.body, python: python, appID: s.appID)?.contains(help) == true)
                        }
                    }
                }
            }
            #expect(s.platform.sendCalls == 0)
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == 3)
        }
    }

    /// The race of the decision and the ingress's deadline: decisions from well before to well
    /// after a 3 s wait, in 300 ms steps. Every message is answered exactly one way: passively
    /// (and never through the API), or through the API after `success`.
    @Test func aReplyGoesOutExactlyOneWayWhateverItsTiming() async throws {
        try await withStack(quota: 100, shards: 4) { s in
            let echo = DelayedEcho()
            let w = try await s.worker(concurrency: 32, handlers: [echo], replyMode: .passiveFirst)
            let delays = Array(stride(from: 0, through: 6_000, by: 300))
            let bodies = Locked<[String: String]>([:])
            // All pushes at once, each on a connection of its own (the shared client's pool
            // queues requests beyond 8 per host, and a queued push would run out of time).
            var pool = HTTPClient.Configuration()
            pool.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: pool)
            defer { _ = client.shutdown() }
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "3") { ingress in
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        for d in delays {
                            group.addTask {
                                let user = "oRace\(d)"
                                s.platform.userPushed(openID: user, msgType: "text", event: nil)
                                let result = try await ingress.pusher(.safe, tries: 1).push(
                                    try pushXML("\(d):回复\(d)", from: user), openID: user, client: client)
                                #expect(result.status == 200)
                                bodies.withLock { $0[user] = result.body }
                            }
                        }
                        try await group.waitForAll()
                    }
                }
                try await eventually("every message finished") {
                    workerMetric(w, #"wechat_worker_messages_total{outcome="replied"}"#) == delays.count
                }
            }
            var passive = 0
            for d in delays {
                let user = "oRace\(d)"
                let inResponse = try passiveText(bodies.withLock { $0[user] } ?? "", appID: s.appID)
                let viaAPI = s.platform.messages(touser: user).compactMap(\.content)
                if let inResponse {
                    passive += 1
                    #expect(inResponse == "回复\(d)")
                    #expect(viaAPI.isEmpty, "delay \(d) ms: answered passively and through the API")
                } else {
                    #expect(viaAPI == ["回复\(d)"], "delay \(d) ms: answered `success` and not through the API")
                }
            }
            #expect(passive >= 1)  // the decisions made at once
            #expect(passive < delays.count)  // and those well after the deadline
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == passive)
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="customer_service"}"#) == delays.count - passive)
            #expect(s.platform.sendCalls == delays.count - passive)
        }
    }

    /// A user's later message is never answered passively before an earlier one's reply went
    /// out: the first misses its wait and goes through the API; the second, quick, is answered
    /// (either way) only after that send.
    @Test func aLaterMessageWaitsForTheEarlierOnesReply() async throws {
        try await withStack { s in
            let echo = DelayedEcho()
            let w = try await s.worker(handlers: [echo], replyMode: .passiveFirst)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "1") { ingress in
                    let user = "oOrder"
                    s.platform.userPushed(openID: user, msgType: "text", event: nil)
                    async let first = ingress.pusher(.plaintext, tries: 1).push(try pushXML("1500:一", from: user), openID: user)
                    // The second is pushed once the first is being decided (so it arrived later).
                    try await eventually("the first message to be deciding") { echo.started.withLock { $0 } == ["一"] }
                    let second = try await ingress.pusher(.plaintext, tries: 1).push(try pushXML("0:二", from: user), openID: user)
                    let apiBefore = s.platform.messages(touser: user).compactMap(\.content)
                    if let text = try passiveText(second.body, appID: s.appID) {
                        #expect(text == "二")
                        #expect(apiBefore == ["一"], "the second answered passively before the first's reply went out")
                    } else {
                        #expect(await s.replies(to: user, count: 2) == ["一", "二"])
                    }
                    #expect(try passiveText(try await first.body, appID: s.appID) == nil)
                }
            }
        }
    }
}

extension PassiveReplyTests {
    /// passive-only: the decision comes after the first push's wait; WeChat's retry of the push
    /// (the simulator's pusher retries a timed-out push, as WeChat does) is answered with it.
    /// The API is never called.
    @Test func passiveOnlyAnswersWeChatsRetry() async throws {
        try await withStack { s in
            let w = try await s.worker(handlers: [DelayedEcho()], replyMode: .passiveOnly)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "2.5") { ingress in
                    let user = "oRetry"
                    // WeChat's 5 s, scaled down: the pusher gives up after 2 s and pushes again; the
                    // decision comes after 3 s, when the first push is given up.
                    let result = try await ingress.pusher(.compatible, timeout: .seconds(2)).push(try pushXML("3000:晚到的回复", from: user), openID: user)
                    #expect(result.tries >= 2)
                    #expect(try passiveText(result.body, appID: s.appID) == "晚到的回复")
                    // The user's next message goes on, answered in its first push.
                    let next = try await ingress.pusher(.compatible).push(try pushXML("帮助", from: user), openID: user)
                    #expect(try passiveText(next.body, appID: s.appID) == help)
                }
            }
            #expect(s.platform.sendCalls == 0)
            #expect(workerMetric(w, #"wechat_worker_passive_total{outcome="missed"}"#) == 0)
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == 2)
        }
    }

    /// passive-only: a decision later than WeChat's last push is dropped and counted; the
    /// user's next message goes on. A reply without a passive form (a menu) is never sent.
    @Test func passiveOnlyDropsWhatNoPushTook() async throws {
        try await withStack { s in
            struct Menu: MessageHandler {
                func decide(_ message: InboundMessage, session: SessionSnapshot) async throws -> ReplyRules.Decision? {
                    guard case .text(let text) = message.kind, text == "菜单?" else { return nil }
                    let menu = CustomerServiceMessage.Content.msgMenu(headContent: "选", list: [.init(id: "1", content: "一")], tailContent: "")
                    return .init(reply: CustomerServiceMessage(toUser: message.fromUserName, content: menu), setState: nil)
                }
            }
            let w = try await s.worker(handlers: [DelayedEcho(), Menu()], replyMode: .passiveOnly)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "1") { ingress in
                    let user = "oDrop"
                    // Three pushes, 0.8 s apart, each waited for 1 s: the decision at 5 s is after all of them.
                    await #expect(throws: PushError.self) {
                        try await ingress.pusher(.plaintext, timeout: .milliseconds(800)).push(try pushXML("5000:太晚", from: user), openID: user)
                    }
                    // The user's later messages wait behind it (order), so the drop comes first.
                    try await eventually("the late reply to be dropped") {
                        workerMetric(w, #"wechat_worker_passive_total{outcome="dropped"}"#) == 1
                    }
                    let menu = try await ingress.pusher(.plaintext).push(try pushXML("菜单?", from: user), openID: user)
                    #expect(menu.body == "success")
                    let next = try await ingress.pusher(.plaintext).push(try pushXML("帮助", from: user), openID: user)
                    #expect(try passiveText(next.body, appID: s.appID) == help)
                }
            }
            #expect(s.platform.sendCalls == 0)
            #expect(workerMetric(w, #"wechat_worker_passive_total{outcome="dropped"}"#) == 1)
            #expect(workerMetric(w, #"wechat_worker_passive_total{outcome="undeliverable"}"#) == 1)
        }
    }

    /// An ingress that took an offer and never gave its verdict (it died between the two): the
    /// send is uncertain; `resend` sends it through the API (passive-first), once.
    @Test func noVerdictIsAnUncertainSend() async throws {
        try await withStack { s in
            let w = try await s.worker(replyMode: .passiveFirst)
            // A stand-in ingress: it takes the offer and says nothing.
            let queue = PassiveHandshake.ingressQueuePrefix(s.topology.prefix) + ".mute"
            try await s.pusher.declare(AMQPTopology(queues: [.init(queue, durable: false, exclusive: true)]))
            let offers = try await s.pusher.consume(queue: queue)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                let user = "oMute"
                let xml = try pushXML("帮助", from: user)
                let m = try InboundMessage(xml: xml)
                s.platform.userPushed(openID: user, msgType: "text", event: nil)
                try await s.publishWaited(xml, m, user: user, queue: queue, requestID: "request-1")
                let offer = try await nextOffer(offers)
                #expect(offer.message.properties.correlationID == "request-1")
                #expect(offer.message.bodyString?.contains(help) == true)
                try offer.ack()
                #expect(await s.replies(to: user, count: 1) == [help])
            }
            await offers.cancel()
            #expect(workerMetric(w, #"wechat_worker_messages_total{outcome="uncertain"}"#) == 1)
            #expect(s.platform.messages(touser: "oMute").count == 1)
        }
    }
}

extension PassiveReplyTests {
    /// During a rotation (`WECHAT_PREVIOUS_TOKEN`, `WECHAT_PREVIOUS_AES_KEY`) a push signed and
    /// encrypted with the old Token and key is answered with the old ones, which WeChat still
    /// uses; one with the new ones with the new ones.
    @Test func aPassiveReplyIsSealedWithTheKeysThePushCameUnder() async throws {
        try await withStack { s in
            let w = try await s.worker(replyMode: .passiveFirst)
            let oldKey = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkA"
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                try await withIngress(s, wait: "3", extra: ["WECHAT_PREVIOUS_TOKEN": "oldtok", "WECHAT_PREVIOUS_AES_KEY": oldKey]) { ingress in
                    var old = Pusher(
                        ingressURL: "http://127.0.0.1:\(ingress.port)/wechat", appID: s.appID, token: "oldtok", aesKey: try EncodingAESKey(oldKey),
                        accountID: "gh_test", mode: .safe)
                    old.tries = 1
                    let result = try await old.push(try pushXML("帮助", from: "oRotate"), openID: "oRotate")
                    // Read as WeChat still configured with the old Token and key reads it.
                    #expect(try old.passiveReply(in: result.body)?[child: "Content"]?.text == help)
                    let current = try await ingress.pusher(.safe).push(try pushXML("帮助", from: "oRotate2"), openID: "oRotate2")
                    #expect(try passiveText(current.body, appID: s.appID) == help)
                }
            }
        }
    }

    /// Without its reply queue (its broker connection being set up) the ingress cannot wait for
    /// a reply: it answers 503 (WeChat pushes again) and is not ready; nothing is published.
    @Test func withoutItsReplyQueueTheIngressAnswers503() async throws {
        try await withStack { s in
            try await withIngress(s, wait: "3", consumeReplies: false) { ingress in
                let result = try await ingress.pusher(.plaintext, tries: 1).push(try pushXML("帮助", from: "oNoQueue"), openID: "oNoQueue")
                #expect(result.status == 503)
                let ready = try await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(ingress.port)/readyz"), timeout: .seconds(5))
                #expect(ready.status.code == 503)
            }
            let queued = try await (0..<s.topology.shardCount).asyncMap { try await s.pusher.queueInfo(s.topology.shardQueue($0)).messageCount }
            #expect(queued.reduce(0, +) == 0)
        }
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out.append(try await transform(e)) }
        return out
    }
}

extension Stack {
    /// Publishes a push as an ingress that waits for its passive reply at `queue` would.
    func publishWaited(_ xml: String, _ m: InboundMessage, user: String, queue: String, requestID: String, waitMs: Int64 = 1_000) async throws {
        try await pusher.publish(
            AMQPMessage(
                xml,
                properties: AMQPProperties(
                    contentType: "application/xml",
                    headers: [
                        WeChatTopology.Header.openID: .string(user), WeChatTopology.Header.msgType: "text",
                        PassiveHandshake.replyByHeader: .int(Int64(Date().timeIntervalSince1970 * 1000) + waitMs),
                    ], correlationID: requestID, replyTo: queue, messageID: m.dedupID)),
            exchange: topology.inboundExchange, routingKey: topology.routingKey(appID: appID, openID: user))
    }
}

/// The next offer on a stand-in ingress's reply queue (at most 30 s).
func nextOffer(_ offers: AMQPConsumer) async throws -> AMQPDelivery {
    try await withThrowingTaskGroup(of: AMQPDelivery?.self) { group in
        group.addTask {
            var iterator = offers.makeAsyncIterator()
            return try await iterator.next()
        }
        group.addTask {
            try await Task.sleep(for: .seconds(30))
            return nil
        }
        defer { group.cancelAll() }
        return try #require(try await group.next() ?? nil, "no offer within 30 s")
    }
}

extension PassiveReplyTests {
    /// WeChat pushes a message again only when it got no answer in time: a reply taken by an
    /// ingress whose response came too late (an overloaded ingress) is offered again to the
    /// retry's ingress — and not sent through the API; but not once a later message of the
    /// user was answered (order).
    @Test func aRetryOfAPushAnsweredPassivelyGetsTheReplyAgain() async throws {
        try await withStack { s in
            let w = try await s.worker(replyMode: .passiveFirst)
            let queue = PassiveHandshake.ingressQueuePrefix(s.topology.prefix) + ".late"
            try await s.pusher.declare(AMQPTopology(queues: [.init(queue, durable: false, exclusive: true)]))
            let offers = try await s.pusher.consume(queue: queue)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                let user = "oLate"
                let xml = try pushXML("帮助", from: user, msgID: 777)
                let m = try InboundMessage(xml: xml)
                s.platform.userPushed(openID: user, msgType: "text", event: nil)
                try await s.publishWaited(xml, m, user: user, queue: queue, requestID: "first", waitMs: 3_000)
                let first = try await nextOffer(offers)
                try first.ack()
                // The stand-in ingress takes it (writing to a connection WeChat already gave up on).
                try await s.pusher.publish(
                    AMQPMessage("taken", properties: AMQPProperties(persistent: false, correlationID: first.message.properties.messageID)),
                    exchange: "", routingKey: try #require(first.message.properties.replyTo), mandatory: false)
                try await eventually("the reply to be marked sent") {
                    workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == 1
                }
                // WeChat's retry of the push, at another request.
                try await s.publishWaited(xml, m, user: user, queue: queue, requestID: "retry", waitMs: 3_000)
                let again = try await nextOffer(offers)
                try again.ack()
                #expect(again.message.properties.correlationID == "retry")
                #expect(again.message.bodyString?.contains(help) == true)
                try await eventually("the re-offer to be counted") { workerMetric(w, #"wechat_worker_passive_total{outcome="reoffered"}"#) == 1 }
                // The user's next message is answered (no ingress waits for it: through the API);
                // a retry of the first after that is not offered again: it would come out of order.
                try await s.push("text", "菜单", from: user)
                _ = await s.replies(to: user, count: 1)
                try await s.publishWaited(xml, m, user: user, queue: queue, requestID: "late-retry", waitMs: 3_000)
                try await eventually("the skipped re-offer to be counted") {
                    workerMetric(w, #"wechat_worker_passive_total{outcome="reoffer_skipped"}"#) == 1
                }
                #expect(workerMetric(w, #"wechat_worker_passive_total{outcome="reoffered"}"#) == 1)
            }
            await offers.cancel()
            #expect(s.platform.sendCalls == 1)  // the second message only
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == 1)
        }
    }
}

/// wechatpy's reading of an encrypted passive reply (`WECHATPY_PYTHON`, installed by ops/test).
func wechatpyDecrypts(_ envelope: String, python: String, appID: String) async throws -> String? {
    let root = try WeChatXML.parse(envelope)
    let script = """
        import sys
        from wechatpy.crypto import WeChatCrypto
        token, key, appid, envelope, signature, timestamp, nonce = sys.argv[1:8]
        sys.stdout.write(WeChatCrypto(token, key, appid).decrypt_message(envelope, signature, timestamp, nonce))
        """
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("wechatpy-passive-\(UUID().uuidString).py").path
    try script.write(toFile: path, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await runCommand(
        python,
        [
            path, "tok", passiveKey, appID, envelope, root[child: "MsgSignature"]?.text ?? "", root[child: "TimeStamp"]?.text ?? "",
            root[child: "Nonce"]?.text ?? "",
        ])
}

/// The ingress process killed while a push waits for its passive reply: its reply queue goes
/// with its connection, the worker's offer is unroutable (certainly not taken), and the reply
/// goes through the API, once.
@Suite("Passive replies: ingress killed", .enabled(if: (TestServices.amqpEnabled && TestServices.redisEnabled && TestServices.environment["WR_BIN_DIR"] != nil) || TestServices.isCI), .timeLimit(.minutes(6)))
struct PassiveIngressKillTests {
    @Test func anIngressKilledMidWaitLeavesTheReplyToTheAPI() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "WR_BIN_DIR is set by ops/test")
        // The ingress process routes over the contract's 8 shards: the stack must have them all
        // (with 2, a push whose shard was 2…7 went nowhere; the shard depends on the random AppID).
        try await withStack(shards: 8) { s in
            let echo = DelayedEcho()
            let w = try await s.worker(handlers: [echo], replyMode: .passiveFirst)
            let port = try freePort()
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("killed-ingress-\(UUID().uuidString).log").path
            let child = try ChildProcess(
                "\(bin)/wechat-ingress",
                environment: [
                    "WECHAT_APPID": s.appID, "WECHAT_TOKEN": "tok", "AMQP_URL": s.amqpURL, "WECHAT_QUEUE_PREFIX": s.topology.prefix,
                    "HTTP_HOST": "127.0.0.1", "HTTP_PORT": String(port), "INGRESS_REPLY_WAIT": "5", "LOG_LEVEL": "warning",
                ], logPath: log)
            defer { child.kill() }
            // Ready, not only listening: until its broker connection and reply queue are up, a
            // push is answered 503 (and this test's single try would be lost; seen once in CI).
            try await eventually("the ingress to be ready") {
                guard let r = try? await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port)/readyz"), timeout: .seconds(2))
                else { return false }
                return r.status == .ok
            }
            try await running([w]) {
                await w.waitUntilOwning(8)
                let user = "oOrphan"
                s.platform.userPushed(openID: user, msgType: "text", event: nil)
                var pusher = Pusher(ingressURL: "http://127.0.0.1:\(port)/wechat", appID: s.appID, token: "tok", aesKey: nil, accountID: "gh_test", mode: .plaintext)
                pusher.tries = 1
                let push = Task { try await pusher.push(try pushXML("1500:孤儿回复", from: user), openID: user) }
                try await eventually("the worker to be deciding") { !echo.started.withLock { $0 }.isEmpty }
                child.kill()
                _ = await push.result  // the connection dies with the process
                #expect(await s.replies(to: user, count: 1) == ["孤儿回复"])
            }
            #expect(workerMetric(w, #"wechat_worker_passive_total{outcome="missed"}"#) == 1)
            #expect(workerMetric(w, #"wechat_worker_replies_total{channel="passive"}"#) == 0)
            #expect(s.platform.messages(touser: "oOrphan").count == 1)
        }
    }
}

/// Which replies have a passive form, and `WORKER_REPLY_MODE`.
@Suite("Passive replies: forms and settings")
struct PassiveFormTests {
    @Test func theTypesWeChatHasPassiveFormsForMapToThem() throws {
        let article = CustomerServiceMessage.NewsArticle(title: "t", description: "d", url: "https://u", picurl: "https://p")
        let cases: [(CustomerServiceMessage.Content, PassiveReply.Content?)] = [
            (.text(content: "你好"), .text("你好")),
            (.image(mediaID: "m"), .image(mediaID: "m")),
            (.voice(mediaID: "m"), .voice(mediaID: "m")),
            (.video(mediaID: "m", thumbMediaID: "t", title: "T", description: nil), .video(mediaID: "m", title: "T", description: nil)),
            (
                .music(title: "T", description: "D", musicURL: "u", hqMusicURL: "h", thumbMediaID: "t"),
                .music(title: "T", description: "D", musicURL: "u", hqMusicURL: "h", thumbMediaID: "t")
            ),
            (.news(articles: [article]), .news([article])),
            (.mpnews(mediaID: "m"), nil),
            (.msgMenu(headContent: "h", list: [], tailContent: "t"), nil),
            (.wxcard(cardID: "c"), nil),
            (.miniProgramPage(title: "t", appID: "a", pagePath: "p", thumbMediaID: "m"), nil),
        ]
        for (content, passive) in cases {
            #expect(PassiveOffers.content(for: CustomerServiceMessage(toUser: "o", content: content)) == passive, "\(content.msgType)")
        }
    }

    @Test func theReplyModeIsReadAndABadOneNamesTheVariable() throws {
        for mode in ReplyMode.allCases {
            #expect(try WorkerConfiguration(RelayEnvironment(["WECHAT_APPID": "wx1", "WORKER_REPLY_MODE": mode.rawValue])).replyMode == mode)
        }
        #expect(try WorkerConfiguration(RelayEnvironment(["WECHAT_APPID": "wx1"])).replyMode == .customerService)
        #expect { try WorkerConfiguration(RelayEnvironment(["WECHAT_APPID": "wx1", "WORKER_REPLY_MODE": "passive"])) } throws: {
            ($0 as? ConfigurationError)?.variable == "WORKER_REPLY_MODE"
        }
    }
}

/// In the passive modes WeChat's repeats of a push join the job in hand. A redelivery after
/// the worker's connection broke is no such copy: the broken connection's jobs give their
/// deliveries up, and the redelivered ones must be processed. (Failed before copies were told
/// apart by connection: the user's queued second message, redelivered, was acked with its
/// stale job's end and never answered.)
@Suite("Passive replies: connection loss", .enabled(if: TestServices.amqpEnabled && TestServices.redisEnabled), .timeLimit(.minutes(6)))
struct PassiveConnectionLossTests {
    @Test func redeliveriesAfterABrokenConnectionAreNotTakenForCopies() async throws {
        try await withStack { s in
            let proxy = try AMQPProxy(targetPort: AMQPConfiguration(url: s.amqpURL).port)
            defer { proxy.stop() }
            let echo = DelayedEcho()
            let w = try await s.worker(consumingURL: proxy.url, handlers: [echo], replyMode: .passiveFirst)
            try await running([w]) {
                try await eventually("the worker to be ready") { w.isConsuming }
                let user = "oBroken"
                try await s.push("text", "1500:一", from: user)
                try await s.push("text", "0:二", from: user)  // waits behind the first, in this worker
                try await eventually("the first to be deciding") { echo.started.withLock { $0 } == ["一"] }
                proxy.cutAll()
                try await eventually("both replies", within: 30) { s.platform.messages(touser: user).count >= 2 }
                #expect(await s.replies(to: user, count: 2) == ["一", "二"])
            }
            #expect(s.platform.messages(touser: "oBroken").count == 2)
        }
    }
}
