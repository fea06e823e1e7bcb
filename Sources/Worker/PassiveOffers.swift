import AMQP
import Foundation
import Logging
import RelayAMQP
import RelayContract
import RelayCore
import WeChat

/// Where a push's ingress waits for a passive reply: from its `reply_to`, `correlation_id` and
/// ``PassiveHandshake/replyByHeader``.
struct PassiveTarget: Sendable {
    let queue: String
    let requestID: String
    /// When the ingress stops waiting, milliseconds since the Unix epoch.
    let replyBy: Int64

    init?(_ delivery: AMQPDelivery) {
        let p = delivery.message.properties
        guard let queue = p.replyTo, let requestID = p.correlationID,
            let replyBy = p.headers[PassiveHandshake.replyByHeader]?.intValue
        else { return nil }
        self.queue = queue
        self.requestID = requestID
        self.replyBy = replyBy
    }

    /// Milliseconds left before the ingress stops waiting (negative once it has).
    func msLeft(now: Int64 = Int64(Date().timeIntervalSince1970 * 1000)) -> Int64 { replyBy - now }
}

/// The worker's side of the passive-reply handshake (``PassiveHandshake``): its verdict queue,
/// and offers waiting for their verdicts.
package final class PassiveOffers: Sendable {
    /// What became of an offer.
    enum Outcome: Sendable, Equatable {
        /// The ingress wrote it to WeChat.
        case taken
        /// Certainly not sent passively: the ingress declined it, or it never reached one
        /// (unroutable: the ingress is gone; not published at all).
        case declined(String)
        /// No verdict in time: the ingress may or may not have written it (it died, or a
        /// connection broke, between the two).
        case unknown(String)
    }

    /// The verdict queue: exclusive to the consuming connection (a new one after a reconnection).
    private let verdictQueue: PrivateQueue
    private let consuming: AMQPConnection
    private let publisher: AMQPConnection
    private let logger: Logger
    private let verdicts = Rendezvous<PassiveHandshake.Verdict>()

    init(consuming: AMQPConnection, publisher: AMQPConnection, prefix: String, logger: Logger) {
        self.consuming = consuming
        self.publisher = publisher
        self.verdictQueue = PrivateQueue(amqp: consuming, prefix: PassiveHandshake.workerQueuePrefix(prefix), logger: logger)
        self.logger = logger
    }

    /// The passive form of a customer-service message, where WeChat has one (text, image,
    /// voice, video, music, news); `nil` for the rest (menus, cards, mini programs, …).
    package static func content(for message: CustomerServiceMessage) -> PassiveReply.Content? {
        switch message.content {
        case .text(let content): return .text(content)
        case .image(let id): return .image(mediaID: id)
        case .voice(let id): return .voice(mediaID: id)
        case .video(let id, _, let title, let description): return .video(mediaID: id, title: title, description: description)
        case .music(let title, let description, let url, let hq, let thumb):
            return .music(title: title, description: description, musicURL: url, hqMusicURL: hq, thumbMediaID: thumb)
        case .news(let articles): return .news(articles)
        default: return nil
        }
    }

    /// Consumes the verdict queue and resolves offers with the verdicts that arrive, until cancelled.
    func consumeVerdicts() async {
        await verdictQueue.consume { [logger, verdicts] delivery in
            guard let offerID = delivery.message.properties.correlationID,
                let verdict = delivery.message.bodyString.flatMap(PassiveHandshake.Verdict.init(rawValue:))
            else {
                return logger.warning("a message on the verdict queue that is no verdict; ignored")
            }
            verdicts.put(verdict, for: offerID)
        }
    }

    /// Whether offers can be made now: the verdict queue is consumed (part of the worker's readiness).
    var isReady: Bool { verdictQueue.name != nil && consuming.isConnected }

    /// Offers `xml` to the ingress waiting at `target` and waits up to `bound` for its verdict.
    func offer(_ xml: [UInt8], to target: PassiveTarget, bound: Duration) async -> Outcome {
        guard let queue = verdictQueue.name, consuming.isConnected else {
            return .declined("the verdict queue is not consumed (broker connection down); not offered")
        }
        let offerID = UUID().uuidString
        verdicts.open(offerID)
        do {
            try await publisher.publish(
                AMQPMessage(
                    body: xml,
                    properties: AMQPProperties(
                        contentType: "application/xml", persistent: false, correlationID: target.requestID, replyTo: queue,
                        messageID: offerID)),
                exchange: "", routingKey: target.queue, mandatory: true, confirmTimeout: max(.milliseconds(100), min(bound, .seconds(2))))
        } catch let e as AMQPError {
            switch e.code {
            case .unroutable:
                _ = verdicts.close(offerID)
                return .declined("the ingress that waited for it is gone (its reply queue no longer exists)")
            case .notConnected, .flowControl, .invalidMessage, .nacked, .exchangeNotFound, .closed:
                _ = verdicts.close(offerID)
                return .declined("the offer was not published: \(e.message)")
            default:
                // Written, fate unknown (a lost confirm): the ingress may have it; wait for the verdict.
                logger.info("an offer's publish is uncertain; waiting for its verdict", metadata: ["error": "\(e)"])
            }
        } catch {
            _ = verdicts.close(offerID)
            return .declined("the offer was not published: \(error)")
        }
        switch await verdicts.wait(offerID, for: bound) {
        case .taken: return .taken
        case .declined: return .declined("the ingress no longer waited")
        case nil: return .unknown("no verdict from the ingress within \(bound)")
        }
    }
}
