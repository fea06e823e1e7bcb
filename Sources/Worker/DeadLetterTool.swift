import AMQP
import RelayCore
import RelayContract

/// `wechat-worker dead-letters list | replay`.
public struct DeadLetterTool: Sendable {
    public let amqp: AMQPConnection
    public let topology: WeChatTopology

    public init(amqp: AMQPConnection, topology: WeChatTopology) {
        self.amqp = amqp
        self.topology = topology
    }

    /// One line per dead letter: reason, user, type, dedup key. Nothing is acknowledged,
    /// so the letters go back to the queue when the listing's channel closes.
    public func list(limit: Int) async throws -> [String] {
        try await take(limit: limit) { d in
            let h = d.message.properties.headers
            return "\(d.message.properties.messageID ?? "-")  user=\(h[WeChatTopology.Header.openID]?.stringValue ?? "-")  type=\(h[WeChatTopology.Header.msgType]?.stringValue ?? "-")  reason=\(h[WorkerHeader.reason]?.stringValue ?? "rejected")"
        } settle: { d in try d.nack(requeue: true) }
    }

    /// Publishes dead letters back to their shard (confirmed) and removes them; returns how many.
    public func replay(limit: Int) async throws -> Int {
        try await take(limit: limit) { d in
            var m = d.message
            let key = m.properties.headers[WorkerHeader.originalRoutingKey]?.stringValue
                ?? topology.routingKey(appID: m.properties.appID ?? "", openID: m.properties.headers[WeChatTopology.Header.openID]?.stringValue ?? "")
            for h in [WorkerHeader.reason, WorkerHeader.retryCount, WorkerHeader.originalRoutingKey, WorkerHeader.order] { m.properties.headers[h] = nil }
            try await amqp.publish(m, exchange: topology.inboundExchange, routingKey: key, confirmTimeout: .seconds(10))
            return key
        } settle: { d in try d.ack() }.count
    }

    private func take<T: Sendable>(
        limit: Int, _ body: (AMQPDelivery) async throws -> T, settle: (AMQPDelivery) throws -> Void
    ) async throws -> [T] {
        let count = min(limit, try await amqp.queueInfo(topology.deadLetterQueue).messageCount)
        guard count > 0 else { return [] }
        let consumer = try await amqp.consume(queue: topology.deadLetterQueue, prefetch: UInt16(min(count, 1000)))
        var out: [T] = []
        var held: [AMQPDelivery] = []
        for try await d in consumer {
            out.append(try await body(d))
            held.append(d)
            if out.count == count { break }
        }
        await consumer.cancel()
        for d in held { try settle(d) }
        return out
    }
}
