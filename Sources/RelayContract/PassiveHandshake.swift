/// The names of the passive-reply handshake between an ingress that waits
/// (`INGRESS_REPLY_WAIT`) and a worker that offers (`WORKER_REPLY_MODE`), over RabbitMQ.
/// The protocol and its cases are in docs/worker.md, "Passive replies".
///
/// 1. The ingress publishes a push with `reply_to` = its reply queue (``ingressQueuePrefix(_:)``), `correlation_id` = a
///    request id of its own, and ``replyByHeader`` = the moment (ms since the epoch) it stops waiting.
/// 2. A worker holding the message's claim publishes an *offer* to that queue (default
///    exchange, mandatory): the passive reply's plaintext XML, `correlation_id` = the request id,
///    `message_id` = an offer id, `reply_to` = the worker's verdict queue.
/// 3. The ingress decides under one lock whether the request still waits: if so the offer is
///    *taken* — written to WeChat, then the verdict ``Verdict/taken`` goes back — otherwise
///    ``Verdict/declined`` goes back at once. The verdict's `correlation_id` is the offer id.
public enum PassiveHandshake {
    /// On a push the ingress waits for: when it stops waiting, milliseconds since the Unix epoch.
    public static let replyByHeader = "x-relay-reply-by-ms"

    /// An ingress's reply queues are `<this>.<uuid>`: exclusive to its connection (a new one
    /// after every reconnection), so a queue vanishes with its connection or process.
    public static func ingressQueuePrefix(_ prefix: String) -> String { "\(prefix).reply" }

    /// A worker's verdict queues are `<this>.<uuid>`, exclusive to its consuming connection.
    public static func workerQueuePrefix(_ prefix: String) -> String { "\(prefix).verdict" }

    /// The ingress's answer to an offer, in the verdict's body.
    public enum Verdict: String, Sendable {
        /// The reply was written to WeChat in the HTTP response: it went out passively.
        case taken
        /// The request no longer waited (its deadline passed, the offer came twice, the
        /// response could not be written): the reply did not go out passively.
        case declined
    }
}
