import AMQP
import Foundation
import Logging
import Synchronization

/// An exclusive queue of this process, consumed for as long as ``consume(_:)`` runs: a new
/// one (a new name) on every broker connection, since an exclusive queue dies with its
/// connection. While there is none (not connected yet, or reconnecting), ``name`` is nil.
///
/// The passive-reply handshake uses two: the ingress's reply queue and each worker's verdict
/// queue. A message published to a name that no longer exists is unroutable.
public final class PrivateQueue: Sendable {
    private let amqp: AMQPConnection
    private let prefix: String
    private let logger: Logger
    /// The queue consumed now and the connection it was declared on.
    private let current = Mutex<(name: String, generation: UInt64)?>(nil)

    /// - Parameter prefix: the queues are named `<prefix>.<uuid>`.
    public init(amqp: AMQPConnection, prefix: String, logger: Logger) {
        self.amqp = amqp
        self.prefix = prefix
        self.logger = logger
    }

    /// The queue being consumed now, if any: nil as soon as the connection it was declared on
    /// is gone (the queue went with it), before the consuming loop has noticed.
    public var name: String? {
        let live = amqp.generation
        return current.withLock { c in c.flatMap { $0.generation == live && live != 0 ? $0.name : nil } }
    }

    /// Declares a queue, consumes it with `handle` (each delivery acked first), and after a lost
    /// connection does it again with a new queue; until the task is cancelled.
    public func consume(_ handle: @escaping @Sendable (AMQPDelivery) async -> Void) async {
        while !Task.isCancelled {
            let name = "\(prefix).\(UUID().uuidString.lowercased())"
            var generation: UInt64 = 0
            do {
                try await amqp.waitUntilConnected()
                generation = amqp.generation
                try await amqp.declareForThisConnection(AMQPTopology(queues: [.init(name, durable: false, exclusive: true)]))
                let deliveries = try await amqp.consume(queue: name, prefetch: 256)
                // Declared and consumed on one connection, or not used at all.
                if amqp.generation == generation { current.withLock { $0 = (name, generation) } }
                for try await delivery in deliveries {
                    try? delivery.ack()
                    await handle(delivery)
                }
            } catch is CancellationError {
            } catch {
                if !Task.isCancelled {
                    logger.warning("cannot consume a private queue; a new one follows", metadata: ["amqp.queue": "\(name)", "error": "\(error)"])
                }
            }
            current.withLock { if $0?.name == name { $0 = nil } }
            if Task.isCancelled { break }
            // After a reconnection a new queue at once; after another failure, a pause first.
            if amqp.generation == generation || !amqp.isConnected { try? await Task.sleep(for: .milliseconds(200)) }
        }
    }
}
