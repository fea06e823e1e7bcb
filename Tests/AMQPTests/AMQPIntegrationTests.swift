import AMQP
import Logging
import ServiceLifecycle
import TestSupport
import Testing

let testLogger: Logger = {
    var l = Logger(label: "amqp-test")
    l.logLevel = .warning
    return l
}()

func connectToTestBroker(topology: AMQPTopology = AMQPTopology(), url: String? = nil) async throws -> AMQPConnection {
    var config = try AMQPConfiguration(url: url ?? TestServices.amqpURL(), connectionName: "amqp-tests")
    config.maxReconnectDelay = .milliseconds(500)
    return try await AMQPConnection.connect(configuration: config, topology: topology, logger: testLogger)
}

/// A direct exchange bound to one durable queue, with a dead-letter queue behind it.
func testTopology(_ name: String) -> AMQPTopology {
    AMQPTopology(
        exchanges: [.init("\(name).x"), .init("\(name).dlx", type: "fanout")],
        queues: [
            .init("\(name).q", deadLetterExchange: "\(name).dlx"),
            .init("\(name).dlq"),
        ],
        bindings: [
            .init(queue: "\(name).q", exchange: "\(name).x", routingKey: "k"),
            .init(queue: "\(name).dlq", exchange: "\(name).dlx"),
        ])
}

func cleanUp(_ amqp: AMQPConnection, _ name: String) async {
    for q in ["\(name).q", "\(name).dlq"] { _ = try? await amqp.deleteQueue(q) }
    for x in ["\(name).x", "\(name).dlx"] { try? await amqp.deleteExchange(x) }
    await amqp.close()
}

@Suite("AMQP client against the real broker", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct AMQPIntegrationTests {
    /// Hardening #13: a consumer the broker cancels (its queue deleted) ends its sequence, so
    /// the worker can see it and start a new one.
    @Test(arguments: [AMQPTopology.Queue.Kind.classic, .quorum])
    func aConsumerWhoseQueueIsDeletedEnds(kind: AMQPTopology.Queue.Kind) async throws {
        let name = TestServices.unique("cancelled")
        let topology = AMQPTopology(queues: [.init("\(name).q", kind: kind, singleActiveConsumer: true)])
        let amqp = try await connectToTestBroker(topology: topology)
        let other = try await connectToTestBroker()
        let consumer = try await amqp.consume(queue: "\(name).q", prefetch: 1)
        let ended = Task {
            do {
                for try await _ in consumer {}
                return "finished"
            } catch {
                return "threw"
            }
        }
        _ = try await other.deleteQueue("\(name).q")
        let how = await ended.value
        #expect(how == "threw")
        await other.close()
        await amqp.close()
    }

    /// Hardening #2: a short-string property over 255 bytes was refused by librabbitmq after the
    /// method frame went out, and the client dropped the connection, failing every publish in flight.
    @Test func aMessageAMQPCannotCarryFailsAloneAndTheConnectionStays() async throws {
        let name = TestServices.unique("shortstr")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let long = String(repeating: "m", count: 300)
        let bad: [AMQPProperties] = [
            AMQPProperties(messageID: long), AMQPProperties(correlationID: long), AMQPProperties(appID: long),
            AMQPProperties(type: long), AMQPProperties(headers: [long: "v"]), AMQPProperties(headers: ["t": .table([long: 1])]),
        ]
        try await withThrowingTaskGroup(of: Bool.self) { group in
            // Good publishes in flight around the bad ones: every one of them is confirmed.
            for i in 0..<50 {
                group.addTask {
                    try await amqp.publish(AMQPMessage("ok \(i)", properties: AMQPProperties(messageID: "id\(i)")), exchange: "\(name).x", routingKey: "k")
                    return true
                }
            }
            for p in bad {
                group.addTask {
                    do {
                        try await amqp.publish(AMQPMessage("bad", properties: p), exchange: "\(name).x", routingKey: "k")
                        return false
                    } catch let e as AMQPError {
                        return e.code.rawValue == "invalidMessage" && !e.isRetriable && !e.message.contains(long)
                    }
                }
            }
            for try await ok in group { #expect(ok) }
        }
        await #expect(throws: AMQPError.self) {
            try await amqp.publish(AMQPMessage("x"), exchange: String(repeating: "x", count: 256), routingKey: "k")
        }
        #expect(amqp.isConnected)
        #expect(try await amqp.queueInfo("\(name).q").messageCount == 50)
        await cleanUp(amqp, name)
    }

    @Test func publishConfirmConsumeAckRoundTrip() async throws {
        let name = TestServices.unique("roundtrip")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let props = AMQPProperties(
            contentType: "application/xml", headers: ["MsgType": "text", "n": 7, "ok": true],
            messageID: "oUser:123", timestamp: 1_700_000_000, appID: "wx123")
        let body = "<xml><Content><![CDATA[你好]]></Content></xml>\u{0}tail"
        try await amqp.publish(AMQPMessage(body, properties: props), exchange: "\(name).x", routingKey: "k")

        let consumer = try await amqp.consume(queue: "\(name).q", prefetch: 10)
        var iterator = consumer.makeAsyncIterator()
        let delivery = try #require(try await iterator.next())
        #expect(delivery.message.bodyString == body)
        #expect(delivery.message.properties == props)
        #expect(delivery.routingKey == "k")
        #expect(delivery.exchange == "\(name).x")
        #expect(!delivery.redelivered)
        try delivery.ack()
        await consumer.cancel()
        // Closing the connection would requeue an unacknowledged message; an acknowledged one is gone.
        await amqp.close()
        let check = try await connectToTestBroker()
        #expect(try await check.queueInfo("\(name).q").messageCount == 0)
        await cleanUp(check, name)
    }

    @Test func nackWithoutRequeueGoesToTheDeadLetterQueue() async throws {
        let name = TestServices.unique("dlx")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        try await amqp.publish(AMQPMessage("poison"), exchange: "\(name).x", routingKey: "k")
        let delivery = try #require(try await amqp.get(queue: "\(name).q"))
        try delivery.nack(requeue: false)
        // Dead-lettering happens in the broker after the nack: await the delivery.
        let deadLetters = try await amqp.consume(queue: "\(name).dlq", prefetch: 1)
        var it = deadLetters.makeAsyncIterator()
        let dead = try #require(try await it.next())
        #expect(dead.message.bodyString == "poison")
        // RabbitMQ records why and from where in x-death.
        guard case .array(let deaths)? = dead.message.properties.headers["x-death"],
            case .table(let first)? = deaths.first
        else {
            Issue.record("dead-lettered message has no x-death header")
            return
        }
        #expect(first["reason"]?.stringValue == "rejected")
        #expect(first["queue"]?.stringValue == "\(name).q")
        try dead.ack()
        await deadLetters.cancel()
        #expect(try await amqp.get(queue: "\(name).q") == nil)
        await cleanUp(amqp, name)
    }

    @Test func requeuedDeliveryComesBackRedelivered() async throws {
        let name = TestServices.unique("requeue")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        try await amqp.publish(AMQPMessage("again"), exchange: "\(name).x", routingKey: "k")
        let first = try #require(try await amqp.get(queue: "\(name).q"))
        try first.reject(requeue: true)
        let second = try #require(try await amqp.get(queue: "\(name).q"))
        #expect(second.redelivered)
        #expect(second.message.bodyString == "again")
        try second.ack()
        await cleanUp(amqp, name)
    }

    @Test func unroutableMandatoryPublishFails() async throws {
        let name = TestServices.unique("unroutable")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        await #expect {
            try await amqp.publish(AMQPMessage("nowhere"), exchange: "\(name).x", routingKey: "no-such-key")
        } throws: { ($0 as? AMQPError)?.code == .unroutable }
        // Routable messages published around it still confirm.
        let a = Task { try await amqp.publish(AMQPMessage("a"), exchange: "\(name).x", routingKey: "k") }
        let b = Task { try await amqp.publish(AMQPMessage("b"), exchange: "\(name).x", routingKey: "nope") }
        let c = Task { try await amqp.publish(AMQPMessage("c"), exchange: "\(name).x", routingKey: "k") }
        try await a.value
        await #expect { try await b.value } throws: { ($0 as? AMQPError)?.code == .unroutable }
        try await c.value
        #expect(try await amqp.queueInfo("\(name).q").messageCount == 2)
        // Without `mandatory`, the broker drops it and confirms.
        try await amqp.publish(AMQPMessage("dropped"), exchange: "\(name).x", routingKey: "nope", mandatory: false)
        await cleanUp(amqp, name)
    }

    /// A publish to a missing exchange fails alone: publishes in flight around it on the
    /// shared publish channel still confirm (a channel error would have failed them all).
    @Test func publishToMissingExchangeFailsAlone() async throws {
        let name = TestServices.unique("noexchange")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let outcomes = await withTaskGroup(of: (Int, AMQPError?).self) { group in
            for i in 0..<200 {
                group.addTask {
                    let exchange = i == 100 ? "\(name).missing" : "\(name).x"
                    do {
                        try await amqp.publish(AMQPMessage("m\(i)"), exchange: exchange, routingKey: "k")
                        return (i, nil)
                    } catch {
                        return (i, error as? AMQPError ?? AMQPError(.protocolError, "\(error)"))
                    }
                }
            }
            var all: [Int: AMQPError?] = [:]
            for await (i, e) in group { all[i] = e }
            return all
        }
        let failed = outcomes.filter { $0.value != nil }
        #expect(failed.keys.sorted() == [100])
        #expect(failed[100]??.code == .exchangeNotFound && failed[100]??.status == 404)
        #expect(try await amqp.queueInfo("\(name).q").messageCount == 199)
        try await amqp.publish(AMQPMessage("ok"), exchange: "\(name).x", routingKey: "k")
        await cleanUp(amqp, name)
    }

    /// A `basic.get` delivery of a channel that closed and opened again is not settled on the
    /// new opening, where its tag names another delivery.
    @Test func aSettlementNeverReachesAReopenedChannel() async throws {
        let name = TestServices.unique("epoch")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        for m in ["m1", "m2"] { try await amqp.publish(AMQPMessage(m), exchange: "\(name).x", routingKey: "k") }
        let d1 = try #require(try await amqp.get(queue: "\(name).q"))
        // A 404 closes the control channel (the broker requeues m1); the next call opens it again.
        await #expect(throws: AMQPError.self) { try await amqp.queueInfo("\(name).missing") }
        let d2 = try #require(try await amqp.get(queue: "\(name).q"))
        #expect(d2.message.bodyString == "m1" && d2.redelivered && d2.deliveryTag == d1.deliveryTag)
        try d1.ack()  // must not acknowledge d2
        try d2.nack(requeue: true)
        // Both back (the requeue reaches the queue asynchronously); had d1's ack taken m1, one would stay.
        try await eventually("m1 and m2 ready again", within: 10) { try await amqp.queueInfo("\(name).q").messageCount == 2 }
        await cleanUp(amqp, name)
        await amqp.close()
    }

    @Test func oversizedHeadersFailAlone() async throws {
        let name = TestServices.unique("headers")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let big = AMQPProperties(headers: ["x-big": .string(String(repeating: "h", count: 200_000))])
        await #expect {
            try await amqp.publish(AMQPMessage("x", properties: big), exchange: "\(name).x", routingKey: "k")
        } throws: { ($0 as? AMQPError)?.code == .invalidMessage }
        try await amqp.publish(AMQPMessage("fine"), exchange: "\(name).x", routingKey: "k")
        #expect(amqp.isConnected)
        await cleanUp(amqp, name)
        await amqp.close()
    }

    @Test func anOversizedBodyFailsAlone() async throws {
        let name = TestServices.unique("oversized")
        var config = try AMQPConfiguration(url: TestServices.amqpURL(), connectionName: "amqp-tests")
        config.maxMessageSize = 1000
        let amqp = try await AMQPConnection.connect(configuration: config, topology: testTopology(name), logger: testLogger)
        await #expect {
            try await amqp.publish(AMQPMessage(body: [UInt8](repeating: 1, count: 1001)), exchange: "\(name).x", routingKey: "k")
        } throws: { ($0 as? AMQPError)?.code == .invalidMessage }
        try await amqp.publish(AMQPMessage(body: [UInt8](repeating: 1, count: 1000)), exchange: "\(name).x", routingKey: "k")
        await cleanUp(amqp, name)
        await amqp.close()
    }

    @Test func conflictingDeclarationIsAClearErrorAndTheConnectionStaysUsable() async throws {
        let name = TestServices.unique("conflict")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        await #expect {
            try await amqp.declare(AMQPTopology(queues: [.init("\(name).q", messageTTL: 1000)]))
        } throws: { error in
            guard let e = error as? AMQPError else { return false }
            return e.code == .channelClosed && e.status == 406 && e.message.contains("PRECONDITION_FAILED")
        }
        #expect(try await amqp.queueInfo("\(name).q").messageCount == 0)
        try await amqp.publish(AMQPMessage("still fine"), exchange: "\(name).x", routingKey: "k")
        await cleanUp(amqp, name)
    }

    /// A name AMQP cannot carry (over 255 bytes) is refused before anything is written:
    /// librabbitmq refused to encode it, which lost the connection (and, once declarations the
    /// broker drops were tried again, would have been tried again for a minute).
    @Test func aDeclarationAMQPCannotCarryFailsAtOnceAndTheConnectionStays() async throws {
        let name = TestServices.unique("longname")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let generation = amqp.generation
        let long = String(repeating: "q", count: 256)
        await #expect {
            try await amqp.declare(AMQPTopology(queues: [.init(long)]))
        } throws: { ($0 as? AMQPError)?.code == .invalidMessage }
        await #expect {
            try await amqp.declare(AMQPTopology(bindings: [.init(queue: "\(name).q", exchange: "\(name).x", routingKey: long)]))
        } throws: { ($0 as? AMQPError)?.code == .invalidMessage }
        await #expect {
            _ = try await AMQPConnection.connect(
                configuration: try AMQPConfiguration(url: TestServices.amqpURL()), topology: AMQPTopology(exchanges: [.init(long)]),
                logger: testLogger)
        } throws: { ($0 as? AMQPError)?.code == .invalidMessage }
        #expect(amqp.generation == generation)
        try await amqp.publish(AMQPMessage("still fine"), exchange: "\(name).x", routingKey: "k")
        await cleanUp(amqp, name)
        await amqp.close()
    }

    @Test func quorumQueueDeclaresAndWorks() async throws {
        let name = TestServices.unique("quorum")
        let topology = AMQPTopology(
            exchanges: [.init("\(name).x")],
            queues: [.init("\(name).q", kind: .quorum, deadLetterExchange: "\(name).dlx", maxLength: 1000)],
            bindings: [.init(queue: "\(name).q", exchange: "\(name).x", routingKey: "k")])
        let amqp = try await connectToTestBroker(topology: topology)
        try await amqp.publish(AMQPMessage("q"), exchange: "\(name).x", routingKey: "k")
        let d = try #require(try await amqp.get(queue: "\(name).q"))
        #expect(d.message.bodyString == "q")
        try d.ack()
        await cleanUp(amqp, name)
    }

    @Test func manyConcurrentPublishersAllGetTheirConfirms() async throws {
        let name = TestServices.unique("concurrent")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let publishers = 50, each = 40
        let confirmed = try await withThrowingTaskGroup(of: Int.self) { group in
            for p in 0..<publishers {
                group.addTask {
                    var n = 0
                    for i in 0..<each {
                        try await amqp.publish(
                            AMQPMessage("\(p)-\(i)", properties: AMQPProperties(messageID: "\(p)-\(i)")),
                            exchange: "\(name).x", routingKey: "k")
                        n += 1
                    }
                    return n
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(confirmed == publishers * each)
        #expect(amqp.confirmsInFlight == 0)
        #expect(try await amqp.queueInfo("\(name).q").messageCount == publishers * each)

        // Consume them all with prefetch and check every one arrived exactly once.
        let consumer = try await amqp.consume(queue: "\(name).q", prefetch: 100)
        var seen = Set<String>()
        for try await d in consumer {
            seen.insert(d.message.bodyString ?? "")
            try d.ack()
            if seen.count == publishers * each { break }
        }
        #expect(seen.count == publishers * each)
        await cleanUp(amqp, name)
    }

    @Test func badCredentialsAreAClearError() async throws {
        let url = try TestServices.amqpURL().replacingOccurrences(of: "guest:guest@", with: "guest:wrong@")
        await #expect {
            _ = try await connectToTestBroker(url: url)
        } throws: { error in
            guard let e = error as? AMQPError else { return false }
            return e.code == .authenticationFailed && !e.message.contains("wrong")
        }
    }

    @Test func unknownVirtualHostIsAClearError() async throws {
        let url = try TestServices.amqpURL().replacingOccurrences(of: "/%2F", with: "/no-such-vhost")
        await #expect {
            _ = try await connectToTestBroker(url: url)
        } throws: { error in
            guard let e = error as? AMQPError else { return false }
            return e.code == .authenticationFailed && e.message.contains("no-such-vhost")
        }
    }

    @Test func refusedConnectionIsAClearError() async throws {
        // Port 1 on loopback: nothing listens there.
        await #expect {
            _ = try await connectToTestBroker(url: "amqp://guest:guest@127.0.0.1:1/%2F")
        } throws: { error in
            guard let e = error as? AMQPError else { return false }
            return e.code == .connectionFailed && e.message.contains("127.0.0.1:1")
        }
    }

    @Test func runsAsAServiceAndClosesOnGracefulShutdown() async throws {
        let name = TestServices.unique("service")
        let amqp = try await connectToTestBroker(topology: testTopology(name))
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: amqp)], logger: testLogger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            try await amqp.publish(AMQPMessage("before shutdown"), exchange: "\(name).x", routingKey: "k")
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(!amqp.isConnected)
        await #expect {
            try await amqp.publish(AMQPMessage("after"), exchange: "\(name).x", routingKey: "k")
        } throws: { ($0 as? AMQPError)?.code == .notConnected || ($0 as? AMQPError)?.code == .closed }
        let check = try await connectToTestBroker()
        #expect(try await check.queueInfo("\(name).q").messageCount == 1)
        await cleanUp(check, name)
    }
}
