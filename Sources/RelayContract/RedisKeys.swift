// Every Redis key of the system, in one place (the table in docs/CONTRACT.md points here).
// All keys start with `WECHAT_QUEUE_PREFIX` and the AppID, so deployments and accounts can
// share one Redis. Every script's keys are one user's (their hash tag, `{<openid>}`), or a
// single key: the layout a Redis Cluster needs (docs/worker.md, "Redis Cluster").

/// The worker's Redis keys, all under one prefix (`WECHAT_QUEUE_PREFIX`, default `wechat`)
/// so that deployments sharing a Redis never see each other's state.
public struct WorkerKeys: Sendable, Hashable {
    public let prefix: String
    public let appID: String

    public init(prefix: String = "wechat", appID: String) {
        self.prefix = prefix
        self.appID = appID
    }

    /// The user's hash tag: the OpenID, with `%`, `{` and `}` escaped (`%25`, `%7B`, `%7D`) so
    /// that the tag cannot end early; a real OpenID has none of them and reads as itself.
    public static func userTag(_ openID: String) -> String {
        guard openID.utf8.contains(where: { $0 == UInt8(ascii: "{") || $0 == UInt8(ascii: "}") || $0 == UInt8(ascii: "%") }) else {
            return openID
        }
        var out = ""
        for c in openID {
            switch c {
            case "%": out += "%25"
            case "{": out += "%7B"
            case "}": out += "%7D"
            default: out.append(c)
            }
        }
        return out
    }

    /// What is wrong with `prefix` as the start of every key, or nil: a brace would make Redis
    /// Cluster read a hash tag in it (every key of the deployment in one slot, or the per-user
    /// tags broken).
    public static func prefixProblem(_ prefix: String) -> String? {
        if prefix.isEmpty { return "WECHAT_QUEUE_PREFIX is empty" }
        if prefix.contains("{") || prefix.contains("}") {
            return "WECHAT_QUEUE_PREFIX must not contain '{' or '}' (Redis Cluster would read a hash tag in every key)"
        }
        return nil
    }

    /// The start of every key of one user: `<prefix>:<appid>:{<openid>}`. The part in braces is
    /// the key's hash tag: all of a user's keys are in one Redis Cluster slot (every script's
    /// keys are one user's), and users spread over all slots (never a whole account in one).
    public func user(_ openID: String) -> String { "\(prefix):\(appID):{\(Self.userTag(openID))}" }
    /// `<prefix>:<appid>:{<openid>}:session` (hash): the user's session, and `fence`, the
    /// highest fencing token that acted on the user (docs/worker.md, "The fence").
    public func session(_ openID: String) -> String { "\(user(openID)):session" }
    /// `<prefix>:<appid>:{<openid>}:msg:<dedupID>` (hash): the per-message record.
    public func record(_ openID: String, _ dedupID: String) -> String { "\(user(openID)):msg:\(dedupID)" }
    /// `<prefix>:<appid>:{<openid>}:msg:<dedupID>:passive` (string): the decision of a message
    /// answered passively, kept a minute for WeChat's retries of its push.
    public func passiveDecision(_ openID: String, _ dedupID: String) -> String { "\(record(openID, dedupID)):passive" }
    /// `<prefix>:<appid>:query:<sha256(timestamp:nonce:signature)>` (string): the message that used a
    /// signed query (one key per signed URL, across users: checked by a script of its own).
    public func signedQuery(_ digest: String) -> String { "\(prefix):\(appID):query:\(digest)" }
    /// `<prefix>:workers` (sorted set): the live workers' heartbeats. One per deployment, not per
    /// account: every account's messages share the shard queues.
    public var workers: String { "\(prefix):workers" }
    /// `<prefix>:fence` (integer): the deployment's fencing-token counter. A worker that becomes a
    /// shard's active consumer takes the next token (`INCR`); every script that acts on a user
    /// raises the user's copy (`fence` in the session) to its token and refuses a lower one.
    /// Per deployment, like the shards.
    public var fenceCounter: String { "\(prefix):fence" }
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
