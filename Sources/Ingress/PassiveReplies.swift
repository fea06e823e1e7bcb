import AMQP
import Foundation
import Logging
import RelayContract
import RelayCore
import ServiceLifecycle
import Synchronization

/// The ingress's side of the passive-reply handshake (``PassiveHandshake``; docs/worker.md,
/// "Passive replies"): its reply queue, and the requests waiting for a worker's offer.
///
/// Each waiting request has a slot; the slot's lock is the one arbiter of the race between an
/// offer and the request's deadline: an offer is *taken* only while the slot still waits, and
/// once the deadline took the slot every later offer is *declined*. So no timing of the two
/// sides can answer one push both with a passive reply and `success`, or take an offer the
/// worker is told was declined.
public final class PassiveReplies: Sendable {
    /// An offer a waiting request took: the reply's plaintext XML, and where its verdict goes.
    struct Offer: Sendable {
        let xml: [UInt8]
        let verdictQueue: String
        let offerID: String
    }

    /// This process's reply queue: exclusive to its broker connection, so it goes away with
    /// the process (a worker's offer to it is then unroutable: certainly not taken).
    public let queue: String
    let amqp: AMQPConnection
    let logger: Logger
    private let waiting = Rendezvous<Offer>()
    private let offersDeclined: @Sendable () -> Void

    /// - Parameter onDeclined: counts an offer that came too late (or twice).
    public init(amqp: AMQPConnection, prefix: String, logger: Logger, onDeclined: @escaping @Sendable () -> Void = {}) {
        self.amqp = amqp
        self.queue = PassiveHandshake.ingressQueue(prefix: prefix, id: UUID().uuidString.lowercased())
        self.logger = logger
        self.offersDeclined = onDeclined
    }

    /// A new request id, whose offers are taken from now until ``wait(_:for:)`` gives up.
    func register() -> String {
        let id = UUID().uuidString
        waiting.open(id)
        return id
    }

    /// Waits up to `bound` for an offer to request `id`; `nil` when the deadline came first
    /// (from then on, every offer to `id` is declined).
    func wait(_ id: String, for bound: Duration) async -> Offer? { await waiting.wait(id, for: bound) }

    /// The request ends without waiting (its publish failed): returns an offer it took, to decline.
    func abandon(_ id: String) -> Offer? { waiting.close(id) }

    /// An offer for request `id`: taken if the request still waits.
    func take(_ offer: Offer, for id: String) -> Bool { waiting.put(offer, for: id) }

    /// Tells the offering worker what became of its offer.
    func send(_ verdict: PassiveHandshake.Verdict, for offer: Offer) async {
        do {
            try await amqp.publish(
                AMQPMessage(
                    body: Array(verdict.rawValue.utf8),
                    properties: AMQPProperties(persistent: false, correlationID: offer.offerID, type: verdict.rawValue)),
                exchange: "", routingKey: offer.verdictQueue, mandatory: false, confirmTimeout: .seconds(5))
        } catch {
            // The worker waits for a verdict a bounded time and then treats the offer as uncertain.
            logger.warning(
                "cannot tell a worker what became of its passive reply; it will count the reply as uncertain",
                metadata: ["verdict": "\(verdict.rawValue)", "error": "\(error)"])
        }
    }

    /// Declares the reply queue and answers offers until graceful shutdown.
    func consume() async throws {
        try await amqp.declare(
            AMQPTopology(queues: [.init(queue, durable: false, exclusive: true, autoDelete: false)]))
        let offers = try await amqp.consume(queue: queue, prefetch: 256)
        for try await delivery in offers {
            try? delivery.ack()
            let p = delivery.message.properties
            guard let id = p.correlationID, let verdictQueue = p.replyTo, let offerID = p.messageID else {
                logger.warning("an offer without correlation_id, reply_to or message_id on the reply queue; ignored")
                continue
            }
            let offer = Offer(xml: delivery.message.body, verdictQueue: verdictQueue, offerID: offerID)
            if !take(offer, for: id) {
                offersDeclined()
                await send(.declined, for: offer)
            }
        }
    }
}

extension PassiveReplies: Service {
    /// Consumes the reply queue until graceful shutdown (retrying while the broker is unreachable).
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await self.amqp.waitUntilConnected()
                    try await self.consume()
                } catch is CancellationError {
                    return
                } catch {
                    if Task.isCancelled { return }
                    self.logger.warning("passive replies: cannot consume the reply queue; trying again", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }
}

/// The verdict of one taken offer, sent once: `taken` after the response was written,
/// `declined` if writing failed — or if the response is dropped unwritten (the connection
/// closed before Hummingbird started it), which this object's deinit sends.
final class VerdictOnce: Sendable {
    private let offer: PassiveReplies.Offer
    private let handshake: PassiveReplies
    private let sent = Atomic<Bool>(false)

    init(offer: PassiveReplies.Offer, handshake: PassiveReplies) {
        self.offer = offer
        self.handshake = handshake
    }

    func send(_ verdict: PassiveHandshake.Verdict) async {
        guard !sent.exchange(true, ordering: .acquiringAndReleasing) else { return }
        await handshake.send(verdict, for: offer)
    }

    deinit {
        guard !sent.load(ordering: .acquiring) else { return }
        let (offer, handshake) = (offer, handshake)
        Task { await handshake.send(.declined, for: offer) }
    }
}
