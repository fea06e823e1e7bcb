// Every Redis key of the system, in one place (the table in docs/CONTRACT.md points here).
// All keys start with `WECHAT_QUEUE_PREFIX` and the AppID, so deployments and accounts can
// share one Redis.

/// The worker's Redis keys, all under one prefix (`WECHAT_QUEUE_PREFIX`, default `wechat`)
/// so that deployments sharing a Redis never see each other's state.
public struct WorkerKeys: Sendable, Hashable {
    public let prefix: String
    public let appID: String

    public init(prefix: String = "wechat", appID: String) {
        self.prefix = prefix
        self.appID = appID
    }

    /// `<prefix>:<appid>:session:<openid>` (hash).
    public func session(_ openID: String) -> String { "\(prefix):\(appID):session:\(openID)" }
    /// `<prefix>:<appid>:msg:<dedupID>` (hash): the per-message record.
    public func record(_ dedupID: String) -> String { "\(prefix):\(appID):msg:\(dedupID)" }
    /// The decision of a message answered passively, kept a minute for WeChat's retries of its push.
    public func passiveDecision(_ dedupID: String) -> String { "\(prefix):\(appID):msg:\(dedupID):passive" }
    /// `<prefix>:<appid>:query:<sha256(timestamp:nonce:signature)>` (string): the message that used a signed query.
    public func signedQuery(_ digest: String) -> String { "\(prefix):\(appID):query:\(digest)" }
    /// `<prefix>:workers` (sorted set): the live workers' heartbeats. One per deployment, not per
    /// account: every account's messages share the shard queues.
    public var workers: String { "\(prefix):workers" }
    /// `<prefix>:fence:<shard>` (integer): the shard's fencing token, raised by each
    /// worker that becomes the shard's active consumer; a worker holding an older token may
    /// neither change a session nor send. Per deployment, like the shards.
    public func fence(_ shard: Int) -> String { "\(prefix):fence:\(shard)" }
    /// `<prefix>:<appid>:send_rate` (string): the account's send-rate limiter (GCRA: the
    /// theoretical arrival time, µs), shared by every worker.
    public var sendRate: String { "\(prefix):\(appID):send_rate" }
    /// `<prefix>:<appid>:quota:<yyyymmdd>` (integer): customer-service sends accepted by WeChat on
    /// that day (Beijing time, when WeChat's daily quota resets), kept two days.
    public func quota(day: String) -> String { "\(prefix):\(appID):quota:\(day)" }
}

/// Where tokend keeps the shared credentials (documented in docs/tokend.md):
/// - `wechat:<appid>:access_token` → `{"value": "…", "expires_at": …, "fetched_at": …}`
/// - `wechat:<appid>:jsapi_ticket` → the same shape
/// - `wechat:<appid>:refresh_lock:<kind>` → the replica refreshing now (SET NX PX)
public struct TokenKeys: Sendable, Hashable {
    public let appID: String
    public let prefix: String

    public init(appID: String, prefix: String = "wechat") {
        self.appID = appID
        self.prefix = prefix
    }

    public var accessToken: String { "\(prefix):\(appID):access_token" }
    public var jsapiTicket: String { "\(prefix):\(appID):jsapi_ticket" }
    public func lock(_ key: String) -> String { "\(key):refresh_lock" }
}
