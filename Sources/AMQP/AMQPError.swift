/// The one error type of the AMQP module.
///
/// Every error has a stable ``Code``, a human-readable message, the librabbitmq
/// status or AMQP reply code where there is one, and whether retrying the same
/// operation later may succeed.
public struct AMQPError: Error, Sendable, CustomStringConvertible {
    /// A stable classification of what went wrong.
    public enum Code: String, Sendable {
        /// The `amqp://` URL could not be parsed.
        case invalidURL
        /// The TCP connection could not be established (refused, unreachable, timed out).
        case connectionFailed
        /// The broker refused the credentials or the virtual host.
        case authenticationFailed
        /// The connection is down (being re-established); nothing was sent.
        case notConnected
        /// The connection broke while the operation was in flight; its outcome is unknown.
        case connectionLost
        /// The broker closed a channel (for example a declaration that conflicts with an existing one).
        case channelClosed
        /// The broker answered a publish with `basic.nack`.
        case nacked
        /// A `mandatory` publish could not be routed to any queue (`basic.return`).
        case unroutable
        /// No confirm arrived within the caller's deadline.
        case confirmTimeout
        /// The connection was closed by the application.
        case closed
        /// A protocol-level failure reported by librabbitmq.
        case protocolError
        /// The delivery belongs to a channel or connection that no longer exists.
        case staleDelivery
        /// A message the protocol cannot carry (for example a short-string property over
        /// 255 bytes); refused before anything was written, so the connection is untouched.
        case invalidMessage
        /// The broker blocked publishing (a memory or disk alarm), or too many publishes are
        /// waiting already; nothing was sent. Retry later.
        case flowControl
        /// The exchange does not exist; nothing was published (and nothing else failed with it).
        case exchangeNotFound
    }

    /// What went wrong.
    public var code: Code
    /// A one-line explanation, safe to log (never contains passwords).
    public var message: String
    /// librabbitmq's status code (negative) or the broker's AMQP reply code (positive), when known.
    public var status: Int32?

    public init(_ code: Code, _ message: String, status: Int32? = nil) {
        self.code = code
        self.message = message
        self.status = status
    }

    /// Whether the same operation may succeed if retried later (for example after a reconnection).
    public var isRetriable: Bool {
        switch code {
        case .connectionFailed, .notConnected, .connectionLost, .nacked, .confirmTimeout, .channelClosed, .flowControl:
            return true
        case .invalidURL, .authenticationFailed, .unroutable, .closed, .protocolError, .staleDelivery, .invalidMessage,
            .exchangeNotFound:
            return false
        }
    }

    /// Whether the broker accepted the connection and then lost it for a reason that may pass
    /// by itself, with nothing changed on our side: the socket broke or timed out, or the broker
    /// closed the connection with 320 `CONNECTION_FORCED` (a node stopping) or 541
    /// `INTERNAL_ERROR` — which is how RabbitMQ answers the declaration of a quorum queue whose
    /// Raft cluster did not form within its timeout (members down, or a machine so busy that the
    /// election took too long). Not: a refused connection or login, a conflicting declaration
    /// (a closed channel), or librabbitmq refusing what we asked it to send (a name over 255
    /// bytes, a table too big), which would fail the same way again.
    var mayPassByItself: Bool {
        guard code == .connectionLost else { return false }
        guard let status else { return true }  // the connection vanished without a word
        if status < 0 { return Status.connectionBroke.contains(status) }
        return status == 320 || status == 541
    }

    public var description: String {
        if let status { return "AMQPError.\(code.rawValue)(\(status)): \(message)" }
        return "AMQPError.\(code.rawValue): \(message)"
    }
}
