import AMQP
import RelayContract

extension WeChatTopology {
    /// What the ingress declares at start-up (and after every reconnection).
    public var inbound: AMQPTopology {
        AMQPTopology(
            exchanges: [
                .init(inboundExchange, type: "direct"),
                .init(deadLetterExchange, type: "fanout"),
            ],
            queues: (0..<shardCount).map { n in
                .init(shardQueue(n), kind: .quorum, deadLetterExchange: deadLetterExchange, singleActiveConsumer: true)
            } + [.init(deadLetterQueue, kind: .quorum)],
            bindings: (0..<shardCount).map { n in
                .init(queue: shardQueue(n), exchange: inboundExchange, routingKey: shardRoutingKey(n))
            } + [.init(queue: deadLetterQueue, exchange: deadLetterExchange)])
    }
}
