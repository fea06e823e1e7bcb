import Foundation
import Redis
import WeChat
import RelayContract

/// A user's session as it was when one message was observed.
///
/// Stored per (appid, OpenID) in the hash ``WorkerKeys/session(_:)``:
/// `subscribed` (and `sub_changed_at`, the CreateTime of the subscription change applied last), `first_seen`, `last_seen`, `messages` (user messages, not events),
/// `last_inbound` and `window` (`message` or `event`: which customer-service
/// window the last push opened), `cs_sent` (customer-service messages sent since),
/// `state` (the dialog state), `last_done` (the dedup id of the user's last finished message:
/// a passive reply is offered again to WeChat's retry only while it is that message's) and any
/// `f:<name>` fields handlers set.
public struct SessionSnapshot: Sendable, Equatable {
    public var values: [String: String]

    /// A snapshot with these hash fields (handlers' tests build their own).
    public init(values: [String: String]) { self.values = values }

    public var subscribed: Bool { values["subscribed"] != "0" }
    public var messages: Int { Int(values["messages"] ?? "0") ?? 0 }
    public var state: String? { values["state"].flatMap { $0.isEmpty ? nil : $0 } }
    public var lastInbound: Int64? { values["last_inbound"].flatMap { Int64($0) } }
    public var window: String? { values["window"] }
    public var csSent: Int { Int(values["cs_sent"] ?? "0") ?? 0 }

    /// For templates: `{{session.messages}}`, `{{session.state}}`, `{{session.<field>}}`.
    public func field(_ name: String) -> String { values[name] ?? values["f:\(name)"] ?? "" }

    /// Whether a customer-service message would surely be refused (protocol page §7):
    /// unsubscribed, outside the window, or over the window's quota. Returns the reason.
    public func sendWouldFail(now: Int64) -> String? {
        if !subscribed { return "user unsubscribed (43004)" }
        guard let start = lastInbound else { return "no customer-service window open (45015)" }
        let (seconds, quota): (Int64, Int) = window == "event" ? (60, 3) : (48 * 3600, 5)
        if now - start >= seconds { return "customer-service window closed (45015)" }
        if csSent >= quota { return "customer-service quota used up (45047)" }
        return nil
    }
}

/// The per-message record and the session updates, done atomically in Redis so
/// that concurrent workers never lose an increment and a redelivered message is
/// neither counted twice nor answered twice.
///
/// Per message, the hash ``WorkerKeys/record(_:)`` holds, while the message is in
/// progress, `snapshot` (the session as observed with this message) and `decision`
/// (the reply decided); once it is finished only `replied` is left, for
/// ``finishedTTL`` seconds — long enough for WeChat's retries (about 15 s) and for a
/// redelivery after a crash or a broker restart, and small (about 200 bytes).
public struct SessionStore: Sendable {
    public let redis: RedisPool
    public let appID: String
    public let keys: WorkerKeys
    public var sessionTTL: Int
    /// Lifetime of an unfinished record (its snapshot and decision), seconds.
    public var recordTTL: Int
    /// Lifetime of a finished record (and of a signed query's claim), seconds.
    public var finishedTTL: Int

    public init(
        redis: RedisPool, appID: String, prefix: String = "wechat", sessionTTL: Int = 30 * 86400, recordTTL: Int = 86400,
        finishedTTL: Int = 3600
    ) {
        self.redis = redis
        self.appID = appID
        self.keys = WorkerKeys(prefix: prefix, appID: appID)
        self.sessionTTL = sessionTTL
        self.recordTTL = recordTTL
        self.finishedTTL = finishedTTL
    }

    func sessionKey(_ openID: String) -> String { keys.session(openID) }
    func recordKey(_ m: InboundMessage) -> String { keys.record(m.fromUserName, m.dedupID) }

    /// The outcome of observing a message.
    public struct Observation: Sendable {
        /// False when this dedup key was seen before (a retry or a redelivery).
        public var isNew: Bool
        public var snapshot: SessionSnapshot
        /// A decision stored by an earlier attempt, if any.
        public var decision: ReplyRules.Decision?
        /// Whether an earlier attempt already finished (replied or decided not to).
        public var replied: Bool
        /// Finished with a passive reply (its decision is then returned too).
        public var repliedPassively: Bool = false
        /// Finished with a passive reply, and a later message of the user has finished since.
        public var laterFinished: Bool = false
        /// The signed query it came with was already used by a different message: a replay
        /// of a seen URL with another body. Never processed.
        public var replayedQuery: Bool = false
        /// The caller's fencing token is below the user's copy: another worker consumes the shard
        /// now and has acted on this user. Nothing was changed.
        public var fenced: Bool = false
    }

    /// A fencing token as this worker holds it for a shard (``WorkerKeys/fenceCounter``).
    public struct Fence: Sendable, Equatable {
        public let token: Int64
        public init(token: Int64) { self.token = token }
    }

    /// The fence check of every script that acts on a user (docs/worker.md, "The fence"): a token
    /// below the user's copy (`fence` in the session) is stale; a higher one raises the copy, so
    /// every older holder is stale for this user from now on. Evaluates to true when fenced.
    private static let fenceLua = """
        local function fenced(s, token, ttl)
          if token == '' then return false end
          local held = tonumber(redis.call('HGET', s, 'fence') or '0') or 0
          local t = tonumber(token)
          if held > t then return true end
          if held < t then
            redis.call('HSET', s, 'fence', token)
            if redis.call('TTL', s) < 0 then redis.call('EXPIRE', s, ttl) end
          end
          return false
        end
        """

    /// The signed-query check: the first message to use a signed query owns it (for
    /// ``finishedTTL``); 1 when it is this message's, 0 when another message used it (a replay).
    /// A script of its own: the key is per signed URL, not the user's (Redis Cluster slots).
    private static let signedQueryScript = RedisScript(
        """
        local owner = redis.call('GET', KEYS[1])
        if owner then return owner == ARGV[1] and 1 or 0 end
        redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
        return 1
        """)

    private static let observeScript = RedisScript(
        fenceLua + """

        local rec, s = KEYS[1], KEYS[2]
        if fenced(s, ARGV[9], ARGV[5]) then return {3, '', '', ''} end
        local replied = redis.call('HGET', rec, 'replied')
        if replied then
          if replied ~= 'p' then return {0, '', '', replied} end
          return {0, '', redis.call('GET', KEYS[3]) or '', replied, redis.call('HGET', s, 'last_done') or ''}
        end
        local snap = redis.call('HGET', rec, 'snapshot')
        if snap then
          return {0, snap, redis.call('HGET', rec, 'decision') or '', ''}
        end
        local now = ARGV[1]
        if redis.call('HEXISTS', s, 'first_seen') == 0 then redis.call('HSET', s, 'first_seen', now, 'subscribed', '1') end
        redis.call('HSET', s, 'last_seen', now)
        if ARGV[2] == '1' then redis.call('HINCRBY', s, 'messages', 1) end
        if ARGV[3] ~= '' then redis.call('HSET', s, 'last_inbound', now, 'window', ARGV[3], 'cs_sent', '0') end
        if ARGV[4] ~= '' then
          -- A subscription change applies only if it is not older than the last one applied
          -- (a delayed unsubscribe must not undo a later subscribe).
          local changed = tonumber(redis.call('HGET', s, 'sub_changed_at') or '')
          local at = tonumber(ARGV[7])
          if changed == nil or at == nil or at >= changed then
            redis.call('HSET', s, 'subscribed', ARGV[4] == 'subscribe' and '1' or '0', 'sub_changed_at', ARGV[7])
          end
        end
        redis.call('EXPIRE', s, ARGV[5])
        snap = cjson.encode(redis.call('HGETALL', s))
        redis.call('HSET', rec, 'snapshot', snap)
        redis.call('EXPIRE', rec, ARGV[6])
        return {1, snap, '', ''}
        """)

    /// Stores a decision unless one is stored (first writer wins), applying its state change;
    /// evaluates to the stored decision. Shared by the commit and commit-and-claim scripts.
    private static let commitLua = """
        local function commit(rec, session, decision, setsState, state, fields)
          local existing = redis.call('HGET', rec, 'decision')
          if existing then return existing end
          redis.call('HSET', rec, 'decision', decision)
          if setsState == '1' then
            if state == '' then redis.call('HDEL', session, 'state') else redis.call('HSET', session, 'state', state) end
          end
          if fields ~= '' then
            for name, value in pairs(cjson.decode(fields)) do
              if value == '' then redis.call('HDEL', session, 'f:' .. name) else redis.call('HSET', session, 'f:' .. name, value) end
            end
          end
          return decision
        end
        """

    /// The commit alone (a decision that is not sent now): {0} when fenced (nothing changed), else
    /// {1, stored decision}.
    private static let commitScript = RedisScript(
        commitLua + "\n" + fenceLua + """

            if fenced(KEYS[2], ARGV[5], ARGV[6]) then return {0} end
            return {1, commit(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])}
            """)

    /// A stale fencing token: another worker has acted on this user since (``commit(_:for:fence:)``).
    public struct FencedOut: Error, CustomStringConvertible {
        public var description: String { "fenced out: another worker consumes this shard now" }
    }

    // Marked again (a retry after a WAIT fell short), it still writes: WAIT waits for the
    // offset of the connection's last write, so a mark that wrote nothing would be "acknowledged"
    // without covering the first one.
    private static let markRepliedScript = RedisScript(
        """
        local counted = 0
        if redis.call('HSETNX', KEYS[1], 'replied', ARGV[3]) == 1 then
          if ARGV[1] == '1' then
            redis.call('HINCRBY', KEYS[2], 'cs_sent', 1)
            -- Marked now: the caller counts it in the account's sends today (another slot).
            counted = 1
          end
          -- The user's last finished message (a passive reply is offered again to a retry only
          -- while no later message of the user has finished: order).
          redis.call('HSET', KEYS[2], 'last_done', ARGV[4])
          -- A passive reply's decision is kept a minute under a key of its own: WeChat's retry of
          -- the push (it got no answer in time) is offered it again; the record stays small.
          if ARGV[3] == 'p' then
            local decision = redis.call('HGET', KEYS[1], 'decision')
            if decision then redis.call('SET', KEYS[3], decision, 'EX', 60) end
          end
          redis.call('HDEL', KEYS[1], 'snapshot', 'decision', 'claim', 'claim_until')
        end
        redis.call('EXPIRE', KEYS[1], ARGV[2])
        return counted
        """)

    /// The account's customer-service sends today (its daily quota): one key per account and day.
    private static let quotaScript = RedisScript(
        """
        local today = redis.call('INCR', KEYS[1])
        if today == 1 then redis.call('EXPIRE', KEYS[1], 172800) end
        return today
        """)

    /// Records the message in the session (once per dedup key) and returns the snapshot to decide on.
    /// - Parameter signedQuery: `timestamp:nonce:signature` of the push (the ingress's header), if known.
    /// - Parameter fence: the shard's token this worker holds; a stale one changes nothing
    ///   (``Observation/fenced``).
    public func observe(_ m: InboundMessage, now: Int64, signedQuery: String? = nil, fence: Fence? = nil) async throws -> Observation {
        let isMessage = m.msgType != "event"
        var window = ""
        if isMessage {
            window = "message"
        } else if ["subscribe", "SCAN", "CLICK", "scancode_push", "scancode_waitmsg"].contains(m.event ?? "") {
            window = "event"
        }
        let subscription = m.event == "unsubscribe" ? "unsubscribe" : (m.event == "subscribe" ? "subscribe" : "")
        if let signedQuery {
            // Its own round trip, before the observe: the key is per signed URL, not the user's.
            // A query taken by a message whose observe then was fenced or failed is harmless: the
            // owner is the message (its redelivery finds it its own), not the worker.
            let owner = try await redis.eval(
                Self.signedQueryScript, keys: [keys.signedQuery(WeChatSignature.compute([signedQuery]))],
                arguments: [.init(m.dedupID), .init(finishedTTL)])
            if owner.int == 0 {
                return Observation(isNew: false, snapshot: SessionSnapshot(values: [:]), decision: nil, replied: false, replayedQuery: true)
            }
        }
        let reply = try await redis.eval(
            Self.observeScript,
            keys: [recordKey(m), sessionKey(m.fromUserName), keys.passiveDecision(m.fromUserName, m.dedupID)],
            arguments: [
                .init(now), isMessage ? "1" : "0", .init(window), .init(subscription), .init(sessionTTL), .init(recordTTL),
                .init(m.createTime), .init(m.dedupID), fence.map { .init($0.token) } ?? "",
            ])
        guard let parts = reply.array, parts.count >= 4, let snapText = parts[1].text else {
            throw RedisError(.protocolError, "unexpected answer from the observe script")
        }
        if parts[0].int == 3 {
            return Observation(isNew: false, snapshot: SessionSnapshot(values: [:]), decision: nil, replied: false, fenced: true)
        }
        let flat = FlatJSON.stringArray(parts[1].bytes ?? []) ?? (try? JSONDecoder().decode([String].self, from: Data(snapText.utf8))) ?? []
        var values: [String: String] = [:]
        var i = 0
        while i + 1 < flat.count {
            values[flat[i]] = flat[i + 1]
            i += 2
        }
        values["fence"] = nil  // the fencing copy, not the user's
        let decisionText = parts[2].text ?? ""
        let decision = decisionText.isEmpty
            ? nil : try? JSONDecoder().decode(ReplyRules.Decision.self, from: Data(decisionText.utf8))
        let replied = parts[3].text ?? ""
        return Observation(
            isNew: parts[0].int == 1, snapshot: SessionSnapshot(values: values), decision: decision, replied: replied == "1" || replied == "p",
            repliedPassively: replied == "p", laterFinished: replied == "p" && parts.count > 4 && parts[4].text != m.dedupID)
    }

    /// What ``claim(_:worker:fence:lease:)`` found.
    public enum Claim: Sendable, Equatable {
        /// Ours now: send.
        case claimed
        /// Ours now, but an earlier claim expired without the send being recorded: that
        /// sender may have died after WeChat accepted the message (`WORKER_UNCERTAIN_SEND`).
        case uncertain
        /// Another worker's live claim: wait this long (at most) and ask again.
        case busy(milliseconds: Int64)
        /// Already finished (replied or decided not to): a duplicate.
        case finished
        /// Our fencing token is stale: another worker consumes the shard now. Do not send.
        case fenced
    }

    /// The claim (see ``claim(_:worker:fence:lease:)``): evaluates to {kind, milliseconds}.
    private static let claimLua = """
        local function claim(rec, s, worker, token, leaseMs, ttl, sessionTTL)
          if redis.call('HGET', rec, 'replied') then return {'finished', 0} end
          if fenced(s, token, sessionTTL) then return {'fenced', 0} end
          local t = redis.call('TIME')
          local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          local owner = redis.call('HGET', rec, 'claim')
          local untilMs = tonumber(redis.call('HGET', rec, 'claim_until') or '0')
          if owner and owner ~= worker and untilMs > now then return {'busy', untilMs - now} end
          redis.call('HSET', rec, 'claim', worker, 'claim_until', now + tonumber(leaseMs))
          if redis.call('TTL', rec) < 0 then redis.call('EXPIRE', rec, ttl) end
          if owner and (owner ~= worker or untilMs <= now) then return {'uncertain', 0} end
          return {'claimed', 0}
        end
        """

    private static let claimScript = RedisScript(fenceLua + "\n" + claimLua + "\nreturn claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])")

    /// The commit and the claim in one round trip (a new decision that is about to be sent):
    /// {kind, milliseconds, stored decision}.
    private static let commitAndClaimScript = RedisScript(
        commitLua + "\n" + fenceLua + "\n" + claimLua + """

            -- A stale token changes nothing, not even the session's dialog state.
            if fenced(KEYS[2], ARGV[6], ARGV[9]) then return {'fenced', 0, ''} end
            local stored = commit(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
            local c = claim(KEYS[1], KEYS[2], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
            return {c[1], c[2], stored}
            """)

    private static let releaseScript = RedisScript(
        """
        if redis.call('HGET', KEYS[1], 'claim') == ARGV[1] then redis.call('HDEL', KEYS[1], 'claim', 'claim_until') end
        return 1
        """)

    /// Claims the message for one send by `worker` (atomically: the record, the fence and
    /// the lease are checked and set in one script, with Redis's clock). A claim is the
    /// "about to send" mark; ``markReplied(_:sent:)`` is the "sent" mark; a claim left
    /// without one past its lease is what makes a message uncertain.
    /// - Parameter lease: how long the claim holds others off: longer than one send can take.
    public func claim(_ m: InboundMessage, worker: String, fence: Fence, lease: Duration) async throws -> Claim {
        let (reply, shortfall) = try await replicatedEvalReporting(
            Self.claimScript, keys: [recordKey(m), sessionKey(m.fromUserName)],
            arguments: [.init(worker), .init(fence.token), .init(lease.wholeNanoseconds / 1_000_000), .init(recordTTL), .init(sessionTTL)])
        let claim = try Self.claimAnswer(reply.array ?? [])
        try await giveBackUnreplicated(claim, shortfall, m, worker: worker)
        return claim
    }

    /// A claim no replica acknowledged in time is not used: a fresh one is given back (left in
    /// place, it would expire into a false "uncertain" before the outage's back-off ends), one
    /// taken over from a stopped sender ("uncertain") stays, so that its expiry still says so.
    /// Then the shortfall is thrown as a retriable error.
    private func giveBackUnreplicated(_ claim: Claim, _ shortfall: RedisError?, _ m: InboundMessage, worker: String) async throws {
        guard let shortfall else { return }
        if claim == .claimed { try? await releaseClaim(m, worker: worker) }
        throw shortfall
    }

    /// Stores `decision` (first writer wins, as ``commit(_:for:)``) and claims the message (as
    /// ``claim(_:worker:fence:lease:)``) in one round trip: for a new decision about to be sent.
    /// Returns the stored decision (another worker's, if it committed first) and the claim.
    public func commitAndClaim(
        _ decision: ReplyRules.Decision, for m: InboundMessage, worker: String, fence: Fence, lease: Duration
    ) async throws -> (ReplyRules.Decision, Claim) {
        let (json, args) = try Self.commitArguments(decision)
        let (reply, shortfall) = try await replicatedEvalReporting(
            Self.commitAndClaimScript, keys: [recordKey(m), sessionKey(m.fromUserName)],
            arguments: args + [.init(worker), .init(fence.token), .init(lease.wholeNanoseconds / 1_000_000), .init(recordTTL), .init(sessionTTL)])
        let parts = reply.array ?? []
        let claim = try Self.claimAnswer(parts)
        try await giveBackUnreplicated(claim, shortfall, m, worker: worker)
        guard parts.count == 3 else { throw RedisError(.protocolError, "unexpected answer from the commit-and-claim script") }
        return (Self.stored(parts[2], ours: decision, json: json), claim)
    }

    /// The commit scripts' arguments for `decision`: its JSON, whether it sets the state, the
    /// state, the fields to set as a JSON object (or empty).
    private static func commitArguments(_ decision: ReplyRules.Decision) throws -> (json: String, [RedisArgument]) {
        // The hand-written record covers the common decision; one that sets fields (rare: the
        // decision service's) is written by the encoder, in the same sorted-keys form.
        let record: [UInt8]
        var fields = ""
        if let set = decision.setFields, !set.isEmpty {
            record = try WeChatJSON.encode(decision)
            fields = String(decoding: try WeChatJSON.encode(set), as: UTF8.self)
        } else {
            record = try WeChatJSON.decisionRecord(reply: decision.reply, setState: decision.setState)
        }
        let json = String(decoding: record, as: UTF8.self)
        return (json, [.init(json), decision.setState == nil ? "0" : "1", .init(decision.setState ?? ""), .init(fields)])
    }

    /// The decision a commit script stored: ours (not decoded again) unless another worker's came first.
    private static func stored(_ reply: RedisReply, ours: ReplyRules.Decision, json: String) -> ReplyRules.Decision {
        guard let text = reply.text, text != json,
            let theirs = try? JSONDecoder().decode(ReplyRules.Decision.self, from: Data(text.utf8))
        else { return ours }
        return theirs
    }

    private static func claimAnswer(_ parts: [RedisReply]) throws -> Claim {
        guard parts.count >= 2, let kind = parts[0].text else {
            throw RedisError(.protocolError, "unexpected answer from the claim script")
        }
        switch kind {
        case "claimed": return .claimed
        case "uncertain": return .uncertain
        case "busy": return .busy(milliseconds: Int64(parts[1].int ?? 1000))
        case "finished": return .finished
        case "fenced": return .fenced
        default: throw RedisError(.protocolError, "unexpected answer from the claim script: \(kind)")
        }
    }

    /// Gives up `worker`'s claim after a send that certainly did not go out (an error answer
    /// from WeChat, a refused connection), so that the next attempt is not "uncertain".
    public func releaseClaim(_ m: InboundMessage, worker: String) async throws {
        _ = try await redis.eval(Self.releaseScript, keys: [recordKey(m)], arguments: [.init(worker)])
    }

    /// Takes the deployment's next fencing token (``WorkerKeys/fenceCounter``): called by a worker
    /// when it becomes a shard's active consumer (its first delivery). Every older holder of the
    /// shard is stale for each user the moment this token first acts on that user (the scripts
    /// raise the user's copy); before that, the older holder's work on the user is ordered
    /// before ours, as if it had finished before the hand-over (docs/worker.md, "The fence").
    ///
    /// Under `wait_replicas` the token counts only once replicas have it (as a claim): a failover
    /// must not hand a later holder the token of an earlier one (with a Redis Cluster the counter
    /// and the users' copies live on different nodes, so one node's failover could otherwise roll
    /// the counter back below copies that survived elsewhere).
    public func takeFence(shard: Int) async throws -> Fence {
        let key = keys.fenceCounter
        guard let token = try await replicatedEval(Self.takeFenceScript, keys: [key], arguments: []).int else {
            throw RedisError(.protocolError, "unexpected answer to INCR \(key)")
        }
        return Fence(token: Int64(token))
    }

    private static let takeFenceScript = RedisScript("return redis.call('INCR', KEYS[1])")

    /// Stores the decision (first writer wins) and applies its state change; returns the stored decision.
    /// - Throws: ``FencedOut`` when `fence` is stale for the user (nothing changed).
    public func commit(_ decision: ReplyRules.Decision, for m: InboundMessage, fence: Fence? = nil) async throws -> ReplyRules.Decision {
        let (json, args) = try Self.commitArguments(decision)
        let reply = try await redis.eval(
            Self.commitScript, keys: [recordKey(m), sessionKey(m.fromUserName)],
            arguments: args + [fence.map { .init($0.token) } ?? "", .init(sessionTTL)])
        let parts = reply.array ?? []
        if parts.count == 1, parts[0].int == 0 { throw FencedOut() }
        guard parts.count == 2, parts[0].int == 1 else { throw RedisError(.protocolError, "unexpected answer from the commit script") }
        return Self.stored(parts[1], ours: decision, json: json)
    }

    /// Marks the message finished; `sent` counts a customer-service message against the window's
    /// quota; `passive` records a passive reply (its decision is kept for WeChat's retries).
    /// - Returns: for a customer-service send marked now, the account's sends today (the quota
    ///   count, `<prefix>:<appid>:quota:<day>`, raised right after the mark, only by the call that
    ///   marked: once per message, also when the replicas' acknowledgement fell short and the mark
    ///   is written again); else 0. The count is a key of the account's, in another Redis Cluster
    ///   slot than the user's, so it is a second script: a worker that dies between the two, a mark
    ///   whose reply was lost, or a Redis error on the count leave that send uncounted (0 is
    ///   returned; the mark stands).
    ///   The count drives our alert; WeChat's 45009 stays the authority on the quota.
    @discardableResult
    public func markReplied(_ m: InboundMessage, sent: Bool, passive: Bool = false) async throws -> Int64 {
        let (marked, shortfall) = try await replicatedEvalReporting(
            Self.markRepliedScript,
            keys: [recordKey(m), sessionKey(m.fromUserName), keys.passiveDecision(m.fromUserName, m.dedupID)],
            arguments: [sent ? "1" : "0", .init(finishedTTL), passive ? "p" : "1", .init(m.dedupID)])
        var today: Int64 = 0
        // Counted even when the replicas fell short: the mark written again finds it marked and
        // would not count it. Tried once: INCR is not idempotent, and an error may come after it ran.
        if marked.int == 1 {
            today = (try? await redis.eval(Self.quotaScript, keys: [keys.quota(day: QuotaDay.today())], arguments: []).int) ?? 0
        }
        if let shortfall { throw shortfall }
        return today
    }

    /// Runs a script whose loss in a failover could send a reply twice (a claim, before the
    /// send; the finished mark, before the ack), and, when the Redis URL asks for replicas
    /// (`wait_replicas`, 1 under Sentinel), waits until that many acknowledged it. Fewer in
    /// time is a retriable error: the message waits like in any Redis outage (a claim not
    /// replicated is not sent on; a finished mark not replicated is written again), so a
    /// primary lost right after the write cannot take the only copy with it. Replication is
    /// asynchronous otherwise: a failover can still lose what no `WAIT` covered (an observe
    /// not yet followed by one), which a redelivery then observes again.
    private func replicatedEval(_ script: RedisScript, keys: [String], arguments: [RedisArgument]) async throws -> RedisReply {
        let (reply, shortfall) = try await replicatedEvalReporting(script, keys: keys, arguments: arguments)
        if let shortfall { throw shortfall }
        return reply
    }

    /// The script's reply, and the retriable error to throw when fewer replicas than asked
    /// acknowledged it in time (nil when enough did, or none are asked for).
    private func replicatedEvalReporting(
        _ script: RedisScript, keys: [String], arguments: [RedisArgument]
    ) async throws -> (RedisReply, RedisError?) {
        let replicas = redis.configuration.waitReplicas
        guard replicas > 0 else { return (try await redis.eval(script, keys: keys, arguments: arguments), nil) }
        let timeout = redis.configuration.waitTimeout
        let (reply, acknowledged) = try await redis.eval(script, keys: keys, arguments: arguments, replicas: replicas, timeout: timeout)
        guard acknowledged >= replicas else {
            return (reply, RedisError(.unavailable, "a write was acknowledged by \(acknowledged) of \(replicas) Redis replica(s) within \(timeout); waiting for replication"))
        }
        return (reply, nil)
    }

    /// Before a message found finished is acknowledged: under `wait_replicas`, the finished
    /// mark is written again and waited for (it may be the primary's only copy, left by a
    /// worker whose own `WAIT` fell short); otherwise nothing (no extra round trip).
    public func confirmFinished(_ m: InboundMessage) async throws {
        guard redis.configuration.waitReplicas > 0 else { return }
        try await markReplied(m, sent: false)
    }

    /// The current session (for this repository's tests).
    package func session(_ openID: String) async throws -> SessionSnapshot {
        var values = try await redis.hgetall(sessionKey(openID))
        values["fence"] = nil
        return SessionSnapshot(values: values)
    }
}
