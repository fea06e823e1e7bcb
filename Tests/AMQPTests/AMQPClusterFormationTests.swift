import AMQP
import TestSupport
import Testing

/// A broker that drops a connection for a reason of its own, in the middle of a declaration:
/// a quorum queue declared while its Raft cluster cannot form. RabbitMQ answers such a
/// `queue.declare` after its election timeout with `541 INTERNAL_ERROR … cluster_not_formed` and
/// closes the connection. Here two of three nodes are stopped, so the queue cannot form at all;
/// on a busy machine (CI running the whole suite on two cores) the same answer came from a
/// single node whose election merely took too long, and failed four tests at once.
///
/// Named *Cluster*: ops/test runs it in its second pass, one test at a time.
@Suite("AMQP across a cluster that has not formed", .enabled(if: TestServices.amqpEnabled), .timeLimit(.minutes(8)))
struct AMQPClusterFormationTests {
    /// `AMQPConnection.connect` reports refused connections, refused logins and conflicting
    /// declarations at once, but a connection the broker dropped while it was being set up is
    /// tried again: it connects once the queue's cluster can form.
    @Test func connectWaitsForAQuorumQueueWhoseClusterHasNotFormed() async throws {
        try await PrivateServices.with(cluster: true) { services in
            try await services.stopRabbitMQ(node: 2)
            try await services.stopRabbitMQ(node: 3)
            let proxy = try AMQPProxy(targetPort: try services.amqpPort(node: 1))
            defer { proxy.stop() }
            let queue = TestServices.unique("forming")
            let config = try AMQPConfiguration(url: proxy.url, connectionName: "amqp-tests")
            let connecting = Task {
                try await AMQPConnection.connect(
                    configuration: config, topology: AMQPTopology(queues: [.init(queue, kind: .quorum)]),
                    patience: .seconds(300),  // beyond the test's own bounds: no race with the restarts
                    logger: testLogger)
            }
            // The first set-up failed (the broker dropped the connection) and was tried again.
            try await eventually("a second connection attempt", within: 180) { proxy.accepted >= 2 }
            try await services.startRabbitMQ(node: 2)
            try await services.startRabbitMQ(node: 3)
            let amqp = try await connecting.value
            await expectUsable(queue, on: amqp)
            await amqp.close()
        }
    }

    /// A declaration on a live connection that the broker answers by dropping the connection is
    /// declared again after the reconnection; the caller waits for that instead of failing (a
    /// worker declares its delay queues this way when it starts).
    @Test func aDeclarationTheBrokerDropsIsMadeAgainAfterTheReconnection() async throws {
        try await PrivateServices.with(cluster: true) { services in
            let proxy = try AMQPProxy(targetPort: try services.amqpPort(node: 1))
            defer { proxy.stop() }
            let amqp = try await AMQPConnection.connect(
                configuration: try AMQPConfiguration(url: proxy.url, connectionName: "amqp-tests"), logger: testLogger)
            do {
                try await services.stopRabbitMQ(node: 2)
                try await services.stopRabbitMQ(node: 3)
                let queue = TestServices.unique("forming")
                let declaring = Task {
                    try await amqp.declare(AMQPTopology(queues: [.init(queue, kind: .quorum)]), patience: .seconds(300))
                }
                // The declaration was answered by dropping the connection, which reconnected.
                try await eventually("a reconnection after the dropped declaration", within: 180) { proxy.accepted >= 2 }
                try await services.startRabbitMQ(node: 2)
                try await services.startRabbitMQ(node: 3)
                try await declaring.value
                await expectUsable(queue, on: amqp)
            } catch {
                await amqp.close()
                throw error
            }
            await amqp.close()
        }
    }

    /// The queue exists and its leader works: a message published to it comes back.
    private func expectUsable(_ queue: String, on amqp: AMQPConnection) async {
        do {
            try await amqp.publish(AMQPMessage("formed"), exchange: "", routingKey: queue)
            let got = try await amqp.get(queue: queue)
            #expect(got?.message.bodyString == "formed")
            try got?.ack()
            _ = try await amqp.deleteQueue(queue)
        } catch {
            Issue.record(error, "the queue \(queue) is not usable")
        }
    }
}
