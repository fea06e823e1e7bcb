import AMQP
import Crypto
import Foundation
import Redis
import RelayCore
import Synchronization
import RelayContract

/// Which shards each live worker consumes, agreed through Redis.
///
/// Every worker writes a heartbeat into the sorted set `<prefix>:<appid>:workers`
/// every ``interval``; members silent for ``ttl`` are dropped. The heartbeat is one
/// Lua script that takes the time from Redis (`TIME`), so the workers' own clocks
/// never matter: with skewed clocks each worker used to drop the others' entries
/// (or keep dead ones), the views disagreed, and a shard could be left with no consumer.
///
/// Shards are assigned by rendezvous (highest-random-weight) hashing with a cap per
/// member (``assignment(members:count:)``): shard `s` goes to the member with the highest
/// `SHA-256(member ":" s)` that has room. Every worker reaches the same split from the same
/// view, and a member joining or leaving moves few shards. While views differ for a moment, the queues'
/// single-active-consumer keeps one active consumer per shard.
struct Membership: Sendable {
    let redis: RedisPool
    let key: String
    let id: String
    var interval: Duration = .seconds(2)
    var ttl: Duration = .seconds(10)

    init(redis: RedisPool, key: String, id: String) {
        self.redis = redis
        self.key = key
        self.id = id
    }

    private static let heartbeatScript = RedisScript(
        """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        redis.call('ZADD', KEYS[1], now, ARGV[1])
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        return redis.call('ZRANGE', KEYS[1], 0, -1)
        """)

    /// Records our heartbeat, drops silent members, and returns the live ones.
    /// - Throws: a ``RedisError`` for an unreachable Redis *or an error reply* (which
    ///   must never read as "no other members": the worker would take every shard).
    func heartbeat() async throws -> [String] {
        let ttlMs = ttl.wholeNanoseconds / 1_000_000
        let reply = try await redis.eval(
            Self.heartbeatScript, keys: [key], arguments: [.init(id), .init(ttlMs), .init(ttlMs * 6)])
        guard let members = reply.array else {
            throw RedisError(.protocolError, "unexpected answer from the membership script")
        }
        return try members.map { m in
            guard let text = m.text else { throw RedisError(.protocolError, "unexpected member in the membership set") }
            return text
        }
    }

    func leave() async { _ = try? await redis.send(["ZREM", .init(key), .init(id)]) }

    /// The shards `me` consumes when `members` are alive.
    static func shards(for me: String, members: [String], count: Int) -> Set<Int> {
        Set(assignment(members: members + [me], count: count).filter { $0.value == me }.keys)
    }

    /// Rendezvous hashing with a cap: shard by shard, in order, each goes to the member with
    /// the highest weight that holds fewer than ⌈count / members⌉ shards. Plain rendezvous
    /// would leave one of two workers with most of eight shards half of the time; the cap
    /// keeps the split even, and a member joining or leaving still moves few shards.
    static func assignment(members: [String], count: Int) -> [Int: String] {
        let all = Set(members).sorted()
        guard !all.isEmpty else { return [:] }
        let cap = (count + all.count - 1) / all.count
        var held: [String: Int] = [:]
        var owners: [Int: String] = [:]
        for shard in 0..<count {
            let ranked = all.sorted { a, b in
                let wa = weight(a, shard), wb = weight(b, shard)
                return wa != wb ? wa > wb : a < b
            }
            if let owner = ranked.first(where: { held[$0, default: 0] < cap }) {
                owners[shard] = owner
                held[owner, default: 0] += 1
            }
        }
        return owners
    }

    static func weight(_ member: String, _ shard: Int) -> UInt64 {
        let digest = SHA256.hash(data: Array("\(member):\(shard)".utf8))
        return digest.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }
}

/// One shard's consumer and its jobs. ``run()`` is one task (of the worker's assignment
/// group) holding a task group: the consuming loop, and one job per delivery as a child task.
/// A user's jobs run one after another, in arrival order (``UserTurns``); users run in
/// parallel, each job taking a permit of the worker's ``Limiter`` only while it works.
final class ShardRunner: Sendable {
    let shard: Int
    private let consumer: AMQPConsumer
    private let worker: Worker
    let limiter: Limiter
    private let turns = UserTurns()
    /// Set when the shard is being handed over: no new jobs; waiting retries give their delivery back.
    let draining = Flag()
    private let ended = Flag()
    private let finished = Event()
    /// Set when a hand-over's deadline passed: the jobs still running are cancelled.
    private let cutJobs = Event()
    /// In the passive modes: the copies of each message in hand (WeChat's retries of a push, each
    /// with an ingress waiting for it), handed to the job of the first copy instead of queueing
    /// behind it in the user's line. Keyed by `message_id`; the first copy's job is the entry.
    private let copies = Mutex<[String: [AMQPDelivery]]>([:])
    private let fenceLock = Limiter(permits: 1)
    private let fence = Mutex<(generation: UInt64, fence: SessionStore.Fence)?>(nil)

    /// At most this many deliveries of one user wait in this worker at once; the shard's
    /// loop waits before taking more of that user (the rest stay in the queue, in order).
    /// As many as the prefetch: the loop blocks (every user of the shard waits) only once the
    /// prefetch is full anyway. With a cap below it (16 before accounts had send rates), one
    /// user of a rate-limited account with that many messages waiting for their slots blocked
    /// the shard's other users and accounts for as long as the slots were away.
    let maxQueuedPerUser: Int

    /// Deliveries the broker hands this runner before it acknowledges any: more than the
    /// permits (`WORKER_CONCURRENCY`), so that messages waiting for their account's send rate
    /// (which hold no permit) do not keep the other accounts' messages in the queue behind them
    /// (docs/operations.md, "Fairness between accounts"). A delivery waiting here costs memory
    /// only (its body and headers, about 2 KB).
    static func prefetch(concurrency: Int) -> Int { max(concurrency, 1024) }

    init(shard: Int, worker: Worker, limiter: Limiter) async throws {
        self.shard = shard
        self.worker = worker
        self.limiter = limiter
        maxQueuedPerUser = Self.prefetch(concurrency: worker.concurrency)
        consumer = try await worker.amqp.consume(
            queue: worker.retry.base.shardQueue(shard), prefetch: UInt16(min(Self.prefetch(concurrency: worker.concurrency), Int(UInt16.max))))
    }

    /// Consumes until the consumer ends (``release(deadline:)``, or the broker cancelled it),
    /// and returns once every job has finished.
    func run() async {
        defer { finished.set() }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.dispatch() }
            group.addTask { await self.cutJobs.wait() }
            await group.next()  // dispatching ended (with its jobs), or the deadline cut them
            group.cancelAll()
        }
    }

    private func dispatch() async {
        await withDiscardingTaskGroup { jobs in
            do {
                for try await delivery in consumer {
                    // A user is an OpenID of an account (accounts share the shards).
                    let user = (delivery.message.properties.appID ?? "") + "\n"
                        + (delivery.message.properties.headers[WeChatTopology.Header.openID]?.stringValue ?? "")
                    // A copy of a message whose job is in hand goes to that job (passive modes).
                    let copyKey = worker.offers == nil ? nil : Self.copyKey(delivery)
                    if let copyKey, !admit(copyKey, delivery) { continue }
                    await turns.waitUntilFewer(than: maxQueuedPerUser, for: user)
                    // Handing over: not processed, not acked; closing the channel returns it in order.
                    // Checked and taken under the turns' lock, so release() cannot slip in between.
                    guard let turn = turns.take(user, unless: draining) else {
                        if let copyKey { _ = finishCopies(copyKey) }
                        continue
                    }
                    jobs.addTask {
                        if await turn.waitForPrevious() { await self.worker.process(delivery, on: self) }
                        if let copyKey { self.ackCopies(copyKey) }
                        self.turns.finish(turn)
                    }
                }
                if !draining.isSet {
                    worker.logger.error("consumer ended: the broker cancelled it (queue deleted?)", metadata: ["worker.shard": "\(shard)"])
                }
            } catch {
                worker.logger.error("consumer ended", metadata: ["worker.shard": "\(shard)", "error": "\(error)"])
            }
            ended.set()
        }
    }

    /// Which job's copies a delivery belongs to: its message, on its connection. A delivery of
    /// the same message on a newer connection (the broker redelivering it after a break) is not a
    /// copy: the job of the first one is stale and gives it up, so the redelivery needs a job of
    /// its own — held as a copy, it would be acked with the stale job's end and lost.
    static func copyKey(_ delivery: AMQPDelivery) -> String? {
        delivery.message.properties.messageID.map { "\(delivery.message.properties.appID ?? "")/\($0)#\(delivery.connectionGeneration)" }
    }

    /// Whether `delivery` starts a job of its own: false when a job for the same message is in
    /// hand, which now holds it as a later copy.
    private func admit(_ key: String, _ delivery: AMQPDelivery) -> Bool {
        copies.withLock { c in
            if c[key] != nil {
                c[key]?.append(delivery)
                return false
            }
            c[key] = []
            return true
        }
    }

    private func finishCopies(_ key: String) -> [AMQPDelivery] {
        copies.withLock { $0.removeValue(forKey: key) ?? [] }
    }

    /// The job of `key` ended: its later copies are acknowledged. They are duplicates on the
    /// same connection: the first copy was answered (acked), or went back to the queue (a
    /// hand-over), or to the dead letters, and carries the message either way. (On a broken
    /// connection the acks fail, and the broker has them all back.)
    private func ackCopies(_ key: String) {
        for copy in finishCopies(key) { try? copy.ack() }
    }

    /// How many copies of `key` this job holds (the first included).
    func copyCount(_ key: String) -> Int { copies.withLock { ($0[key]?.count ?? 0) + 1 } }

    /// The latest copy of `key` that came while its job was in hand, if any.
    func latestCopy(_ key: String) -> AMQPDelivery? { copies.withLock { $0[key]?.last } }

    /// Waits up to `bound` for a copy of `key` beyond the `count` held now (WeChat's retry of
    /// the push); `nil` if none came, or the shard is handed over or the worker stops.
    func nextCopy(_ key: String, of delivery: AMQPDelivery, beyond count: Int, upTo bound: Duration) async -> AMQPDelivery? {
        let deadline = ContinuousClock.now + bound
        while ContinuousClock.now < deadline {
            // A delivery of a broken connection gets no more copies (they come to its redelivery's job).
            if draining.isSet || worker.stopping.isSet || Task.isCancelled || delivery.isStale { return nil }
            if copyCount(key) > count { return latestCopy(key) }
            try? await Task.sleep(for: min(.milliseconds(20), deadline - ContinuousClock.now))
        }
        return copyCount(key) > count ? latestCopy(key) : nil
    }

    /// Whether the consumer still runs (false once the broker cancelled it or it failed).
    var isAlive: Bool { !ended.isSet }

    /// The broker says the queue has no consumer: this one is gone even if no cancel reached us.
    func markEnded() { ended.set() }

    /// The fencing token for `delivery`'s work: raised in Redis at the first delivery of each
    /// subscription (deliveries come only to the active consumer, and a new connection is a
    /// new subscription), then reused; any worker that held the shard before is fenced out of
    /// each user as soon as this token acts on the user (docs/worker.md, "The fence").
    func fence(for delivery: AMQPDelivery) async throws -> SessionStore.Fence {
        let generation = delivery.connectionGeneration
        if let held = fence.withLock({ $0 }), held.generation >= generation { return held.fence }
        await fenceLock.acquire()
        defer { fenceLock.release() }
        if let held = fence.withLock({ $0 }), held.generation >= generation { return held.fence }
        // A delivery of a connection that broke since must not raise the fence: another worker
        // may be the shard's consumer by now.
        guard !delivery.isStale else { throw AMQPError(.staleDelivery, "the delivery's connection broke; not taking the fence") }
        let taken = try await worker.store.takeFence(shard: shard)
        fence.withLock { $0 = (generation, taken) }
        worker.logger.debug("took the shard's fence", metadata: ["worker.shard": "\(shard)", "worker.fence": "\(taken.token)"])
        return taken
    }

    /// Waits `delay` (a retry's back-off) unless the shard is being handed over, the worker
    /// stops, the delivery went stale or the job is cancelled; returns whether it waited it all.
    func pause(_ delay: Duration, for delivery: AMQPDelivery) async -> Bool {
        let deadline = ContinuousClock.now + delay
        func interrupted() -> Bool { draining.isSet || worker.stopping.isSet || delivery.isStale || Task.isCancelled }
        while ContinuousClock.now < deadline {
            if interrupted() { return false }
            // Checked every 100 ms near the end, every 500 ms before: a worker can have a
            // thousand messages waiting for their account's send rate, and their wake-ups
            // (10 a second each) took enough CPU to make them send late (BENCHMARKS.md).
            let left = deadline - ContinuousClock.now
            try? await Task.sleep(for: min(left > .seconds(1) ? .milliseconds(500) : .milliseconds(100), left))
        }
        return !interrupted()
    }

    /// Stops taking deliveries, finishes (and acks) the jobs already started — cancelling those still
    /// running after `deadline` (their deliveries go back unacknowledged) — then closes the
    /// channel so that the rest go back to the queue, in order, for the next consumer.
    ///
    /// The consumer stays registered until its channel closes, so that no other worker
    /// becomes active on the shard while this one still has messages of it in hand.
    func release(deadline: Duration) async {
        turns.stop(draining)
        if !(await turns.waitForAll(upTo: deadline)) {
            worker.logger.warning(
                "hand-over deadline passed; cancelling the shard's jobs (their deliveries go back to the queue)",
                metadata: ["worker.shard": "\(shard)"])
            // The channel first (every unacked delivery goes back, in order), then the jobs:
            // cancelling the consuming loop first would cancel the consumer while jobs still hold
            // earlier messages, and the next consumer could overtake them.
            await consumer.close()
            cutJobs.set()
        }
        await consumer.close()
        await finished.wait()
    }
}
