/// A message delivered to a consumer (or fetched with `basic.get`), to be settled exactly once.
public struct AMQPDelivery: Sendable {
    public let message: AMQPMessage
    public let exchange: String
    public let routingKey: String
    /// Whether the broker delivered this message before (to this or another consumer).
    public let redelivered: Bool
    public let deliveryTag: UInt64
    let channel: UInt16
    /// Which opening of `channel` delivered it (a reopened channel numbers deliveries from 1 again).
    let channelEpoch: UInt64
    let generation: UInt64
    let connection: AMQPConnection

    /// Which connection of its ``AMQPConnection`` delivered it (it grows with each
    /// reconnection): a consumer on a newer connection is a new subscription.
    public var connectionGeneration: UInt64 { generation }

    /// Whether the connection this delivery came on has broken since: the broker has already
    /// put the message back (it will come again), so it must not be processed or settled.
    public var isStale: Bool { generation != connection.mailbox.generation }

    /// Acknowledges the delivery: the broker forgets the message.
    ///
    /// The ack is queued for the connection's thread and sent in order with other
    /// settlements; it does not wait for the socket write.
    /// - Throws: ``AMQPError/Code/staleDelivery`` if the connection it came on has
    ///   broken or been closed since (the broker will redeliver the message). A settlement
    ///   for a channel the broker has closed since (the broker requeued the message) is
    ///   dropped without an error: the message comes again either way.
    public func ack() throws { try connection.settle(self, .ack) }

    /// Negatively acknowledges: `requeue: false` dead-letters the message (if the queue
    /// has a dead-letter exchange) or drops it; `requeue: true` puts it back.
    public func nack(requeue: Bool) throws { try connection.settle(self, .nack(requeue: requeue)) }

    /// Rejects the delivery (`basic.reject`), with the same meaning of `requeue` as ``nack(requeue:)``.
    public func reject(requeue: Bool) throws { try connection.settle(self, .reject(requeue: requeue)) }
}

/// The deliveries of one consumer, as an `AsyncSequence`.
///
/// Iterate it from one task. The sequence survives reconnections, ends after
/// ``cancel()`` (once the deliveries already received have been read) or when the
/// connection closes, and throws if the broker cancels the consumer for good
/// (for example because its queue was deleted). Ending the iteration (for
/// example by cancelling the iterating task) also cancels the consumer.
///
/// Deliveries received before a connection broke and not yet read are skipped: the
/// broker requeued them when the connection went, and delivers them again.
public struct AMQPConsumer: AsyncSequence, Sendable {
    public typealias Element = AMQPDelivery

    let stream: AsyncThrowingStream<AMQPDelivery, any Error>
    let id: Int
    let connection: AMQPConnection

    public func makeAsyncIterator() -> Iterator { Iterator(base: stream.makeAsyncIterator()) }

    /// Reads the deliveries, skipping stale ones.
    public struct Iterator: AsyncIteratorProtocol {
        var base: AsyncThrowingStream<AMQPDelivery, any Error>.AsyncIterator

        public mutating func next() async throws -> AMQPDelivery? {
            while let d = try await base.next() {
                if !d.isStale { return d }
            }
            return nil
        }
    }

    /// Stops new deliveries (`basic.cancel`). Deliveries already received stay valid
    /// and can still be acknowledged: use this for graceful shutdown.
    public func cancel() async { await connection.cancelConsumer(id: id) }

    /// Closes the consumer's channel (without a `basic.cancel` first, so that a
    /// single-active-consumer queue activates the next consumer only once this one's
    /// deliveries are back): every delivery not yet acknowledged goes back to the queue, in
    /// order (later acks of them are ignored). Use it to hand a queue over to another consumer.
    public func close() async { await connection.closeConsumer(id: id) }
}
