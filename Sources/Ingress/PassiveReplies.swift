import AMQP
import Foundation
import Logging
import RelayAMQP
import RelayContract
import RelayCore
import ServiceLifecycle
import Synchronization

/// The ingress's side of the passive-reply handshake (``PassiveHandshake``; docs/worker.md,
/// "Passive replies"): its reply queue, and the requests waiting for a worker's offer.
///
/// Each waiting request has a slot (``Rendezvous``); the slot's lock is the one arbiter of the
/// race between an offer and the request's deadline: an offer is *taken* only while the slot
/// still waits, and once the deadline closed the slot every later offer is *declined*. So no
/// timing of the two sides can answer one push both with a passive reply and `success`, or
/// take an offer the worker is told was declined.
public final class PassiveReplies: Sendable {
    /// An offer a waiting request took: the reply's plaintext XML, and where its verdict goes.
    struct Offer: Sendable {
        let xml: [UInt8]
        let verdictQueue: String
        let offerID: String
    }

    /// This process's reply queue: exclusive to its broker connection (a new one after a
    /// reconnection), so a worker's offer to a queue that went with its process or connection
    /// is unroutable: certainly not taken.
    let replies: PrivateQueue
    let amqp: AMQPConnection
    let logger: Logger
    private let waiting = Rendezvous<Offer>()
    private let offersDeclined: @Sendable () -> Void

    /// - Parameter onDeclined: counts an offer that came too late.
    public init(amqp: AMQPConnection, prefix: String, logger: Logger, onDeclined: @escaping @Sendable () -> Void = {}) {
        self.amqp = amqp
        self.replies = PrivateQueue(amqp: amqp, prefix: PassiveHandshake.ingressQueuePrefix(prefix), logger: logger)
        self.logger = logger
        self.offersDeclined = onDeclined
    }

    /// The reply queue consumed now (nil while the broker connection is down or being set up).
    public var queue: String? { replies.name }

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

    /// One delivery of the reply queue: an offer, taken if its request still waits, else declined
    /// (in the background, so that a slow publish holds up no other offer). A redelivered offer
    /// that is not taken is ignored: the first delivery of it was already answered.
    private func received(_ delivery: AMQPDelivery) {
        let p = delivery.message.properties
        guard let id = p.correlationID, let verdictQueue = p.replyTo, let offerID = p.messageID else {
            logger.warning("an offer without correlation_id, reply_to or message_id on the reply queue; ignored")
            return
        }
        let offer = Offer(xml: delivery.message.body, verdictQueue: verdictQueue, offerID: offerID)
        guard !waiting.put(offer, for: id), !delivery.redelivered else { return }
        offersDeclined()
        Task { await send(.declined, for: offer) }
    }
}

extension PassiveReplies: Service {
    /// Consumes the reply queue until graceful shutdown.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await self.replies.consume { delivery in self.received(delivery) }
        }
    }
}

/// The verdict of one taken offer, given at most once: `taken` once the response was written,
/// `declined` when it could not be written (nothing reached WeChat) — or when the response is
/// dropped unwritten (the connection closed before Hummingbird started it), which this
/// object's deinit sends. ``withhold()`` gives none: the worker then counts the send uncertain.
final class VerdictOnce: Sendable {
    private let offer: PassiveReplies.Offer
    private let handshake: PassiveReplies
    private let given = Atomic<Bool>(false)

    init(offer: PassiveReplies.Offer, handshake: PassiveReplies) {
        self.offer = offer
        self.handshake = handshake
    }

    func send(_ verdict: PassiveHandshake.Verdict) async {
        guard !given.exchange(true, ordering: .acquiringAndReleasing) else { return }
        await handshake.send(verdict, for: offer)
    }

    /// No verdict: whether WeChat got the reply is unknown.
    func withhold() { given.store(true, ordering: .releasing) }

    deinit {
        guard !given.load(ordering: .acquiring) else { return }
        let (offer, handshake) = (offer, handshake)
        Task { await handshake.send(.declined, for: offer) }
    }
}
