/// The RabbitMQ topology's names shared by the ingress (which declares and publishes)
/// and the workers (which consume), and the headers of the envelope. Documented in
/// docs/topology.md and docs/CONTRACT.md. The declarations themselves
/// (`WeChatTopology.inbound`) are in `RelayAMQP`, so that this module links no C library.
///
/// With the default prefix `wechat`:
/// - `wechat.inbound` (direct, durable): the ingress publishes each message with
///   routing key `shard.N`, N = FNV-1a(AppID, OpenID) mod ``shardCount``, so all of one
///   user's messages land in the same queue, in arrival order.
/// - `wechat.inbound.N` (quorum; single active consumer; dead-letters to
///   `wechat.dead`): one queue per shard.
/// - `wechat.dead` (fanout) → `wechat.dead.q` (quorum): messages that failed for good.
///
/// Tests use their own prefix so that they can share one broker.
public struct WeChatTopology: Sendable, Hashable {
    public let prefix: String
    /// Fixed per deployment: the ingress and every worker must agree on it.
    public let shardCount: Int

    public init(prefix: String = "wechat", shardCount: Int = 8) {
        precondition(shardCount > 0)
        self.prefix = prefix
        self.shardCount = shardCount
    }

    public var inboundExchange: String { "\(prefix).inbound" }
    public var deadLetterExchange: String { "\(prefix).dead" }
    public var deadLetterQueue: String { "\(prefix).dead.q" }
    public func shardQueue(_ n: Int) -> String { "\(prefix).inbound.\(n)" }
    public func shardRoutingKey(_ n: Int) -> String { "shard.\(n)" }

    /// The shard of a user of an account: FNV-1a over the AppID's UTF-8 bytes, a newline, and
    /// the OpenID's (an OpenID is unique only within its account; accounts share the shard queues).
    public func shard(appID: String, openID: String) -> Int {
        var hash: UInt32 = 2_166_136_261
        for b in appID.utf8 {
            hash ^= UInt32(b)
            hash = hash &* 16_777_619
        }
        hash ^= 0x0A
        hash = hash &* 16_777_619
        for b in openID.utf8 {
            hash ^= UInt32(b)
            hash = hash &* 16_777_619
        }
        return Int(hash % UInt32(shardCount))
    }

    public func routingKey(appID: String, openID: String) -> String { shardRoutingKey(shard(appID: appID, openID: openID)) }

    /// Header names on inbound messages.
    public enum Header {
        public static let msgType = "MsgType"
        public static let event = "Event"
        public static let openID = "OpenID"
        /// Receive time at the ingress, milliseconds since the Unix epoch.
        public static let receivedAtMs = "x-received-at-ms"
        /// `plaintext`, `compatible` or `safe`.
        public static let mode = "x-wechat-mode"
        /// The full deduplication key (``InboundMessage/dedupKey``); `message_id` carries its digest.
        public static let dedupKey = "x-wechat-dedup-key"
        /// `timestamp:nonce:signature` of the signed query the push came with: a second, different
        /// message under the same triple is a replay of a seen URL and is never processed.
        public static let signedQuery = "x-wechat-signed-query"
    }
}
