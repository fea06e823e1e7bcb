import AMQP
import Crypto
import Foundation
import Redis
import RelayCore
import Synchronization
import RelayContract

/// Which shards each live worker consumes, agreed through Redis.
///
/// Every worker writes a heartbeat into the sorted set `{prefix}:{appid}:workers`
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
    let id = UUID().uuidString
    var interval: Duration = .seconds(2)
    var ttl: Duration = .seconds(10)

    init(redis: RedisPool, key: String) {
        self.redis = redis
        self.key = key
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

/// One shard's consumer, its per-user chains and its hand-over.
final class ShardRunner: Sendable {
    let shard: Int
    private let consumer: AMQPConsumer
    private let chains: Chains
    private let loop: Task<Void, Never>
    private let draining = Flag()
    private let ended = Flag()

    /// At most this many deliveries of one user wait in this worker at once; the shard's
    /// loop waits before taking more of that user (the rest stay in the queue, in order).
    static let maxQueuedPerUser = 16

    init(shard: Int, worker: Worker, limiter: Limiter) async throws {
        self.shard = shard
        let consumer = try await worker.amqp.consume(
            queue: worker.retry.base.shardQueue(shard), prefetch: UInt16(min(worker.concurrency, Int(UInt16.max))))
        self.consumer = consumer
        let chains = Chains()
        self.chains = chains
        let draining = self.draining
        let ended = self.ended
        loop = Task {
            defer { ended.set() }
            do {
                for try await delivery in consumer {
                    let user = delivery.message.properties.headers[WeChatTopology.Header.openID]?.stringValue ?? ""
                    await chains.waitUntilFewer(than: Self.maxQueuedPerUser, for: user)
                    // Handing over: not processed, not acked; closing the channel returns it in order.
                    // Checked and appended under the chains' lock, so release() cannot slip in between.
                    // One user's messages run one after another, in arrival order; users run in parallel,
                    // and a job takes a permit only when its turn has come (a user's queued messages
                    // hold no permits that other users could use).
                    let appended = chains.append(user, unless: draining) {
                        await limiter.acquire()
                        await worker.process(delivery)
                        limiter.release()
                    }
                    if !appended { continue }
                }
                if !draining.isSet {
                    worker.logger.error("consumer ended: the broker cancelled it (queue deleted?)", metadata: ["worker.shard": "\(shard)"])
                }
            } catch {
                worker.logger.error("consumer ended", metadata: ["worker.shard": "\(shard)", "error": "\(error)"])
            }
        }
    }

    /// Whether the consumer still runs (false once the broker cancelled it or it failed).
    var isAlive: Bool { !ended.isSet }

    /// The broker says the queue has no consumer: this one is gone even if no cancel reached us.
    func markEnded() { ended.set() }

    /// Stops taking deliveries, finishes (and acks) the ones in hand, then closes the
    /// channel so that the rest go back to the queue, in order, for the next consumer.
    ///
    /// The consumer stays registered until its channel closes, so that no other worker
    /// becomes active on the shard while this one still has messages of it in hand.
    func release() async {
        chains.stopAppending(draining)
        await chains.waitForAll()
        await consumer.close()
        await loop.value
    }
}
