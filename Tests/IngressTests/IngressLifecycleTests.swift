import AsyncHTTPClient
import AMQP
import Hummingbird
import HummingbirdTesting
import Ingress
import NIOCore
import RelayCore
import ServiceLifecycle
import Synchronization
import TestSupport
import Testing
import RelayContract

@Suite("wechat-ingress lifecycle", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct IngressLifecycleTests {
    @Test func brokerOutageGives503AndRecoversByItself() async throws {
        try await PrivateServices.with { services in
            let f = try await IngressFixture.make(amqpURL: services.amqpURL)
            let xml = sampleMessages(openID: "oOutage")[0].xml
            try await f.app.test(.router) { client in
                #expect(try await client.execute(uri: "/wechat?\(query(openID: "oOutage"))", method: .post, body: ByteBuffer(string: xml)).status == .ok)
                try await services.stopRabbitMQ()
                // Stopping the broker closed the connection; wait for the client to notice.
                while f.amqp.isConnected { await Task.yield() }
                #expect(try await client.execute(uri: "/readyz", method: .get).status == .serviceUnavailable)
                let down = try await client.execute(uri: "/wechat?\(query(openID: "oOutage"))", method: .post, body: ByteBuffer(string: xml))
                #expect(down.status == .serviceUnavailable)
                #expect(down.text != "success")
                try await services.startRabbitMQ()
                try await f.amqp.waitUntilConnected()
                #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
                let back = try await client.execute(uri: "/wechat?\(query(openID: "oOutage"))", method: .post, body: ByteBuffer(string: xml))
                #expect(back.status == .ok)
            }
            // The message confirmed before the outage survived the restart; the one after it is there too.
            #expect(try await f.queued() == 2)
            await f.tearDown()
        }
    }

    /// #18: three RabbitMQ nodes. The node the ingress is connected to, which also leads every
    /// shard queue (they were declared through it), stops: the ingress reconnects to another
    /// node, the queues elect new leaders (publishes are nacked meanwhile), and every push made
    /// meanwhile is still answered 200 — the ingress tries a nacked or connectionless publish
    /// again within its confirm deadline instead of answering 503 at once — and is queued.
    /// The node comes back and rejoins; the queues have all three members again.
    @Test func aClusterNodeLossIsRiddenOutWithinTheDeadline() async throws {
        try await PrivateServices.with(cluster: true) { services in
            let f = try await IngressFixture.make(extra: ["INGRESS_CONFIRM_TIMEOUT": "15"], amqpURL: services.amqpURL)
            let xml = sampleMessages(openID: "oNode")[0].xml
            let uri = "/wechat?\(query(openID: "oNode"))"
            let stopped = Locked(false)
            let collected = Locked<[[UInt]]>([])
            try await f.app.test(.live) { client in
                let url = "http://127.0.0.1:\(try #require(client.port))\(uri)"
                // Four pushers, each one push at a time, from before the stop until ten pushes after it.
                let all = try await withThrowingTaskGroup(of: [UInt].self) { group in
                    for _ in 0..<4 {
                        group.addTask {
                            var statuses: [UInt] = []
                            var after = 0
                            while after < 10 {
                                if stopped.withLock({ $0 }) { after += 1 }
                                var request = HTTPClientRequest(url: url)
                                request.method = .POST
                                request.body = .bytes(ByteBuffer(string: xml))
                                statuses.append(try await HTTPClient.shared.execute(request, timeout: .seconds(30)).status.code)
                            }
                            return statuses
                        }
                    }
                    try await eventually("some pushes before the stop") { try await f.queued() >= 8 }
                    try await services.stopRabbitMQ(node: 1)
                    stopped.withLock { $0 = true }
                    var all: [[UInt]] = []
                    for try await statuses in group { all.append(statuses) }
                    return all
                }
                collected.withLock { $0 = all }
                #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
            }
            let pushers = collected.withLock { $0 }
            let answers = pushers.flatMap { $0 }
            let accepted = answers.filter { $0 == 200 }.count
            #expect(answers.count >= 48)
            // A push is answered 200 or 503, nothing else. Whether any is 503 depends on how long
            // the reconnection and the leader elections take against the 15 s confirm deadline: on
            // these two cores, alone, none was (the election takes a few seconds); on a CI machine
            // running the cluster chaos test beside it, 44 of 436 were. That is the contract
            // (503 only while no connection or confirm comes within the deadline; WeChat retries),
            // so the test does not assert a timing, only the outcome.
            #expect(answers.allSatisfy { $0 == 200 || $0 == 503 }, "statuses: \(Dictionary(grouping: answers, by: { $0 }).mapValues(\.count))")
            print("cluster node loss: \(accepted) of \(answers.count) pushes answered 200, the rest 503")
            // Every pusher's last push (the tenth after the stop) is accepted again: the ingress
            // recovered by itself.
            #expect(pushers.count == 4 && pushers.allSatisfy { $0.last == 200 }, "last statuses: \(pushers.map { $0.last ?? 0 })")
            // Every push answered 200 is in a queue (a publish whose confirm was lost with the
            // connection may be there twice: the workers drop such copies).
            #expect(try await f.queued() >= accepted)
            try await services.startRabbitMQ(node: 1)
            try await eventually("node 1 to rejoin and the shard queues to have all members online", within: 90) {
                let out = (try? await services.rabbitmqctl(node: 2, ["list_queues", "-q", "--no-table-headers", "name", "members", "online"])) ?? ""
                let rows = out.split(separator: "\n").filter { $0.contains(f.topology.prefix + ".inbound.") }
                return rows.count == f.topology.shardCount && rows.allSatisfy { $0.components(separatedBy: "@localhost").count - 1 == 6 }
            }
            await f.tearDown()
        }
    }

    /// A broker memory alarm: pushes are refused with 503 (the first one within the confirm
    /// deadline, the rest at once), `/readyz` says why, and everything passes again when the
    /// alarm clears, by itself.
    @Test func aBrokerMemoryAlarmGives503AndRecoversByItself() async throws {
        try await PrivateServices.with { services in
            let f = try await IngressFixture.make(extra: ["INGRESS_CONFIRM_TIMEOUT": "2"], amqpURL: services.amqpURL)
            let xml = sampleMessages(openID: "oAlarm")[0].xml
            let uri = "/wechat?\(query(openID: "oAlarm"))"
            try await f.app.test(.router) { client in
                #expect(try await client.execute(uri: uri, method: .post, body: ByteBuffer(string: xml)).status == .ok)
                try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0"])
                // The broker blocks the connection when it next publishes: that push waits for a
                // confirm that does not come (its deadline), then the connection is known blocked.
                var refused = 0
                try await eventually("the ingress sees the block") {
                    let r = try await client.execute(uri: uri, method: .post, body: ByteBuffer(string: xml))
                    #expect(r.status == .serviceUnavailable)
                    refused += 1
                    return f.amqp.isBlocked
                }
                let ready = try await client.execute(uri: "/readyz", method: .get)
                #expect(ready.status == .serviceUnavailable)
                #expect(ready.text.contains("blocks publishing"))
                for _ in 0..<50 {
                    #expect(try await client.execute(uri: uri, method: .post, body: ByteBuffer(string: xml)).status == .serviceUnavailable)
                }
                try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0.4"])
                try await eventually("the block lifts") { f.amqp.isReady }
                #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
                #expect(try await client.execute(uri: uri, method: .post, body: ByteBuffer(string: xml)).status == .ok)
                #expect(refused >= 1)
            }
            // The two confirmed pushes are queued; a refused one may be too (sent before the block
            // was known, its confirm late): WeChat retries it and the worker drops the duplicate.
            let queued = try await f.queued()
            #expect(queued >= 2 && queued <= 3)
            await f.tearDown()
        }
    }

    @Test func gracefulShutdownLosesNoConfirmedMessage() async throws {
        let f = try await IngressFixture.make()
        let (ports, reportPort) = AsyncStream<Int>.makeStream()
        let app = Application(
            router: buildIngressRouter(f.handler), configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in reportPort.yield(channel.localAddress?.port ?? 0) }, logger: ingressLogger)
        // A second connection for the checks: the ingress's own one closes with the group.
        let checker = try await connectToBroker()
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: f.amqp), .init(service: app)], logger: ingressLogger))
        let accepted = Locked<[String]>([])
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var it = ports.makeAsyncIterator()
            let port = try #require(await it.next())
            let (progress, report) = AsyncStream<Int>.makeStream()
            // Eight clients pushing distinct messages until the server goes away.
            let clients = Task {
                await withTaskGroup(of: Void.self) { clients in
                    for c in 0..<8 {
                        clients.addTask {
                            try? await TestClient.withClient(host: "127.0.0.1", port: port) { client in
                                for i in 0..<10_000 {
                                    let openID = "oShut\(c)"
                                    let xml = "<xml><ToUserName>gh</ToUserName><FromUserName>\(openID)</FromUserName><CreateTime>1</CreateTime><MsgType>text</MsgType><Content>x</Content><MsgId>\(i)</MsgId></xml>"
                                    let r = try await client.execute(
                                        TestClient.Request(
                                            "/wechat?\(query(openID: openID))", method: .post,
                                            headers: [.contentLength: "\(xml.utf8.count)"], body: ByteBuffer(string: xml)))
                                    guard r.status == .ok else { return }
                                    let total = accepted.withLock { a in
                                        a.append("\(openID):\(i)")
                                        return a.count
                                    }
                                    report.yield(total)
                                }
                            }
                        }
                    }
                }
                report.finish()
            }
            // Shut down in the middle of the load.
            for await total in progress where total >= 300 {
                await group.triggerGracefulShutdown()
                break
            }
            await clients.value
            try await tasks.waitForAll()
        }
        // Every request answered `success` is in the queues.
        let answered = Set(accepted.withLock { $0 })
        #expect(answered.count >= 300)
        var queued = Set<String>()
        for s in 0..<f.topology.shardCount {
            let info = try await checker.queueInfo(f.topology.shardQueue(s))
            if info.messageCount == 0 { continue }
            let consumer = try await checker.consume(queue: f.topology.shardQueue(s), prefetch: 500)
            var n = 0
            for try await d in consumer {
                if let id = d.message.properties.headers[WeChatTopology.Header.dedupKey]?.stringValue { queued.insert(id) }
                try d.ack()
                n += 1
                if n == info.messageCount { break }
            }
            await consumer.cancel()
        }
        #expect(answered.isSubset(of: queued))
        for s in 0..<f.topology.shardCount { _ = try? await checker.deleteQueue(f.topology.shardQueue(s)) }
        _ = try? await checker.deleteQueue(f.topology.deadLetterQueue)
        await checker.close()
    }
}

func connectToBroker() async throws -> AMQPConnection {
    try await AMQPConnection.connect(configuration: AMQPConfiguration(url: TestServices.amqpURL()), logger: ingressLogger)
}
