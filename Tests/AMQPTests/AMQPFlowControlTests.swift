import AMQP
import Synchronization
import TestSupport
import Testing

/// A memory alarm on a broker of the test's own (it would block every other suite's publishes).
@Suite("AMQP flow control", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(6)))
struct AMQPFlowControlTests {
    @Test func aMemoryAlarmFailsPublishesPromptlyAndPassesAfterIt() async throws {
        try await PrivateServices.with { services in try await alarm(services) }
    }

    func alarm(_ services: PrivateServices) async throws {
        let name = TestServices.unique("alarm")
        var config = try AMQPConfiguration(url: services.amqpURL, connectionName: "amqp-flow-tests")
        config.maxPendingPublishes = 500
        let amqp = try await AMQPConnection.connect(configuration: config, topology: testTopology(name), logger: testLogger)
        #expect(amqp.isReady)

        struct Tally: Sendable {
            var confirmed = 0
            var flowControl = 0
            var timedOut = 0
            var other: [String] = []
            var maxInFlight = 0
        }
        let tally = Locked(Tally())
        let stop = StopFlag()
        // A publish stream: every call must come back (bounded by its confirm deadline), whatever the broker does.
        let publishers = Task {
            await withTaskGroup(of: Void.self) { group in
                for p in 0..<16 {
                    group.addTask {
                        var i = 0
                        while !stop.isSet {
                            i += 1
                            do {
                                try await amqp.publish(AMQPMessage("p\(p)-\(i)"), exchange: "\(name).x", routingKey: "k", confirmTimeout: .seconds(2))
                                tally.withLock { $0.confirmed += 1 }
                            } catch let e as AMQPError where e.code == .flowControl {
                                tally.withLock { $0.flowControl += 1 }
                                try? await Task.sleep(for: .milliseconds(5))
                            } catch let e as AMQPError where e.code == .confirmTimeout {
                                tally.withLock { $0.timedOut += 1 }
                            } catch {
                                tally.withLock { $0.other.append("\(error)") }
                                try? await Task.sleep(for: .milliseconds(5))
                            }
                            let inFlight = amqp.confirmsInFlight
                            tally.withLock { $0.maxInFlight = max($0.maxInFlight, inFlight) }
                        }
                    }
                }
            }
        }
        try await eventually("publishes confirmed before the alarm") { tally.value.confirmed >= 200 }
        try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0"])
        try await eventually("the broker blocks the connection") { amqp.isBlocked }
        #expect(!amqp.isReady)
        // Refused at once, not queued: nothing was sent.
        let refusedBefore = tally.value.flowControl
        try await eventually("publishes refused during the alarm") { tally.value.flowControl >= refusedBefore + 100 }

        try await services.rabbitmqctl(["set_vm_memory_high_watermark", "0.4"])
        try await eventually("the broker unblocks the connection") { !amqp.isBlocked && amqp.isReady }
        let confirmedAfter = tally.value.confirmed
        try await eventually("publishes confirmed after the alarm") { tally.value.confirmed >= confirmedAfter + 200 }
        stop.set()
        // Every publish call returns (bounded: none hangs on a socket the broker stopped reading).
        try await withTimeout("every publisher returned") { await publishers.value }

        let t = tally.value
        #expect(t.other.isEmpty, "\(t.other.prefix(3))")
        #expect(t.maxInFlight <= config.maxPendingPublishes)
        // Nothing confirmed was lost; a publish that timed out may or may not have reached the queue.
        let queued = try await amqp.queueInfo("\(name).q").messageCount
        #expect(queued >= t.confirmed && queued <= t.confirmed + t.timedOut)
        await cleanUp(amqp, name)
        await amqp.close()
    }
}
