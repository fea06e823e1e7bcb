import AMQP
import Synchronization
import TestSupport
import Testing

/// Stops and restarts a broker of its own mid-run (see ``PrivateServices``).
@Suite("AMQP reconnection across a broker restart", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct AMQPReconnectTests {
    @Test func brokerRestartedMidRun() async throws {
        try await PrivateServices.with { services in try await brokerRestartedMidRun(services) }
    }

    func brokerRestartedMidRun(_ services: PrivateServices) async throws {
        let name = TestServices.unique("restart")
        let amqp = try await connectToTestBroker(topology: testTopology(name), url: services.amqpURL)

        // Every outcome is reported on one stream that the test reads in order.
        enum Event { case confirmed(String), failed(AMQPError.Code), received(String) }
        let (events, report) = AsyncStream<Event>.makeStream()

        // A consumer that must resume by itself after the restart.
        let consumer = try await amqp.consume(queue: "\(name).q", prefetch: 50)
        let consuming = Task {
            for try await d in consumer {
                report.yield(.received(d.message.bodyString ?? ""))
                // Deliveries from before the restart cannot be acked afterwards: they come again.
                try? d.ack()
            }
        }

        // Publishers running while the broker goes away.
        let stopPublishing = StopFlag()
        let publishing = Task {
            await withTaskGroup(of: Void.self) { group in
                for p in 0..<8 {
                    group.addTask {
                        var i = 0
                        while !stopPublishing.isSet {
                            let id = "m\(p)-\(i)"
                            i += 1
                            do {
                                try await amqp.publish(AMQPMessage(id), exchange: "\(name).x", routingKey: "k")
                                report.yield(.confirmed(id))
                            } catch let e as AMQPError {
                                report.yield(.failed(e.code))
                                // While disconnected, `publish` fails at once; wait for the connection.
                                try? await amqp.waitUntilConnected()
                            } catch {
                                report.yield(.failed(.protocolError))
                            }
                        }
                    }
                }
            }
        }

        var confirmed = Set<String>(), received = Set<String>(), failures: [AMQPError.Code] = []
        var phase = 0  // 0: before the stop, 1: broker stopped, 2: restarted
        var confirmedAtRestart = 0
        for await event in events {
            switch event {
            case .confirmed(let id): confirmed.insert(id)
            case .received(let id): received.insert(id)
            case .failed(let code): failures.append(code)
            }
            if phase == 0, confirmed.count >= 200 {
                phase = 1
                try await services.stopRabbitMQ()
            } else if phase == 1, !failures.isEmpty {
                phase = 2
                confirmedAtRestart = confirmed.count
                try await services.startRabbitMQ()
            } else if phase == 2, confirmed.count >= confirmedAtRestart + 200 {
                phase = 3
                stopPublishing.set()
                Task {
                    await publishing.value
                    report.yield(.received("publishers done"))
                }
            } else if phase == 3, received.contains("publishers done") {
                phase = 4
            }
            // Nothing confirmed is lost: every confirmed message reaches the consumer,
            // which resumed by itself after the restart.
            if phase == 4, confirmed.isSubset(of: received) { break }
        }
        #expect(confirmed.isSubset(of: received))
        #expect(confirmed.count >= confirmedAtRestart + 200)
        // In-flight publishes failed instead of hanging, with a connection error.
        #expect(!failures.isEmpty)
        #expect(failures.allSatisfy { [.connectionLost, .notConnected, .confirmTimeout].contains($0) })
        await consumer.cancel()
        _ = await consuming.result
        await cleanUp(amqp, name)
    }

    @Test func backgroundConnectionWaitsForTheBroker() async throws {
        try await PrivateServices.with { services in try await backgroundConnectionWaitsForTheBroker(services) }
    }

    func backgroundConnectionWaitsForTheBroker(_ services: PrivateServices) async throws {
        try await services.stopRabbitMQ()
        var config = try AMQPConfiguration(url: services.amqpURL)
        config.maxReconnectDelay = .milliseconds(300)
        let amqp = try AMQPConnection(configuration: config, logger: testLogger)
        #expect(!amqp.isConnected)
        await #expect {
            try await amqp.publish(AMQPMessage("x"), exchange: "", routingKey: "q")
        } throws: { ($0 as? AMQPError)?.code == .notConnected }
        try await services.startRabbitMQ()
        try await amqp.waitUntilConnected()
        #expect(amqp.isConnected)
        await amqp.close()
    }
}

final class StopFlag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .relaxed) }
    func set() { value.store(true, ordering: .relaxed) }
}
