/// Exchanges, queues and bindings to declare on a connection.
///
/// A connection remembers everything it declared and declares it again after
/// every reconnection, so that a broker restart (or a failover to another
/// cluster node) leaves the application's topology in place.
public struct AMQPTopology: Sendable, Hashable {
    public var exchanges: [Exchange]
    public var queues: [Queue]
    public var bindings: [Binding]

    public init(exchanges: [Exchange] = [], queues: [Queue] = [], bindings: [Binding] = []) {
        self.exchanges = exchanges
        self.queues = queues
        self.bindings = bindings
    }

    /// Appends another topology's declarations to this one.
    public mutating func merge(_ other: AMQPTopology) {
        for e in other.exchanges where !exchanges.contains(e) { exchanges.append(e) }
        for q in other.queues where !queues.contains(q) { queues.append(q) }
        for b in other.bindings where !bindings.contains(b) { bindings.append(b) }
    }

    public var isEmpty: Bool { exchanges.isEmpty && queues.isEmpty && bindings.isEmpty }

    /// Refuses, with ``AMQPError/Code/invalidMessage``, what AMQP cannot carry — a name, type,
    /// routing key or argument name over 255 bytes — before anything is written: librabbitmq
    /// would refuse to encode it, and the connection would be lost with it.
    public func validate() throws {
        let short = AMQPMessage.validateShortString
        for e in exchanges {
            try short(e.name, "exchange name")
            try short(e.type, "exchange type")
            try AMQPMessage.validate(e.arguments, path: "exchange argument")
        }
        for q in queues {
            try short(q.name, "queue name")
            try AMQPMessage.validate(q.arguments, path: "queue argument")
        }
        for b in bindings {
            try short(b.queue, "queue name")
            try short(b.exchange, "exchange name")
            try short(b.routingKey, "binding key")
            try AMQPMessage.validate(b.arguments, path: "binding argument")
        }
    }

    /// An exchange declaration.
    public struct Exchange: Sendable, Hashable {
        public var name: String
        /// `direct`, `fanout`, `topic`, `headers`, or a plugin type such as `x-consistent-hash`.
        public var type: String
        public var durable: Bool
        public var autoDelete: Bool
        public var `internal`: Bool
        public var arguments: AMQPTable

        public init(
            _ name: String, type: String = "direct", durable: Bool = true, autoDelete: Bool = false,
            internal: Bool = false, arguments: AMQPTable = [:]
        ) {
            self.name = name
            self.type = type
            self.durable = durable
            self.autoDelete = autoDelete
            self.internal = `internal`
            self.arguments = arguments
        }
    }

    /// A queue declaration.
    public struct Queue: Sendable, Hashable {
        public enum Kind: String, Sendable, Hashable {
            case classic, quorum
        }
        public var name: String
        public var durable: Bool
        public var exclusive: Bool
        public var autoDelete: Bool
        public var arguments: AMQPTable

        /// - Parameters:
        ///   - kind: `quorum` sets `x-queue-type: quorum` (replicated; must be durable and non-exclusive).
        ///   - deadLetterExchange: `x-dead-letter-exchange`: where rejected or expired messages go.
        ///   - deadLetterRoutingKey: `x-dead-letter-routing-key`.
        ///   - messageTTL: `x-message-ttl`, milliseconds.
        ///   - maxLength: `x-max-length`.
        ///   - singleActiveConsumer: `x-single-active-consumer`.
        public init(
            _ name: String, kind: Kind = .classic, durable: Bool = true, exclusive: Bool = false,
            autoDelete: Bool = false, deadLetterExchange: String? = nil, deadLetterRoutingKey: String? = nil,
            messageTTL: Int64? = nil, maxLength: Int64? = nil, singleActiveConsumer: Bool = false,
            arguments: AMQPTable = [:]
        ) {
            var args = arguments
            if kind == .quorum { args["x-queue-type"] = .string("quorum") }
            if let deadLetterExchange { args["x-dead-letter-exchange"] = .string(deadLetterExchange) }
            if let deadLetterRoutingKey { args["x-dead-letter-routing-key"] = .string(deadLetterRoutingKey) }
            if let messageTTL { args["x-message-ttl"] = .int(messageTTL) }
            if let maxLength { args["x-max-length"] = .int(maxLength) }
            if singleActiveConsumer { args["x-single-active-consumer"] = .bool(true) }
            self.name = name
            self.durable = durable
            self.exclusive = exclusive
            self.autoDelete = autoDelete
            self.arguments = args
        }
    }

    /// A queue-to-exchange binding.
    public struct Binding: Sendable, Hashable {
        public var queue: String
        public var exchange: String
        public var routingKey: String
        public var arguments: AMQPTable

        public init(queue: String, exchange: String, routingKey: String = "", arguments: AMQPTable = [:]) {
            self.queue = queue
            self.exchange = exchange
            self.routingKey = routingKey
            self.arguments = arguments
        }
    }
}

/// A queue's counters as reported by a passive declaration.
public struct AMQPQueueInfo: Sendable, Hashable {
    public var name: String
    /// Messages ready for delivery (not counting unacknowledged ones).
    public var messageCount: Int
    public var consumerCount: Int
}
