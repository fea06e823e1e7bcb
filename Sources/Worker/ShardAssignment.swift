import AMQP
import Foundation
import Redis
import RelayCore
import Synchronization

/// Which shards each live worker consumes, agreed through Redis.
///
/// Every worker writes a heartbeat into the sorted set `{prefix}:{appid}:workers`
/// (score: time in ms) every ``interval``; members silent for ``ttl`` are dropped.
/// With the live members sorted by id, member `i` of `n` takes the shards `s`
/// with `s % n == i`, so all workers reach the same split from the same view.
/// While views differ for a moment, the queues' single-active-consumer keeps one
/// active consumer per shard.
struct Membership: Sendable {
    let redis: RedisPool
    let key: String
    let id = UUID().uuidString
    var interval: Duration = .seconds(2)
    var ttl: Duration = .seconds(10)

    init(redis: RedisPool, appID: String, topology: WeChatTopology) {
        self.redis = redis
        self.key = "\(topology.prefix):\(appID):workers"
    }

    /// Records our heartbeat, drops silent members, and returns the live ones.
    func heartbeat() async throws -> [String] {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let replies = try await redis.pipeline([
            ["ZADD", .init(key), .init(now), .init(id)],
            ["ZREMRANGEBYSCORE", .init(key), "-inf", .init(now - Int64(ttl.components.seconds * 1000))],
            ["PEXPIRE", .init(key), .init(ttl.components.seconds * 1000 * 6)],
            ["ZRANGE", .init(key), "0", "-1"],
        ])
        return (replies.last?.array ?? []).compactMap(\.text)
    }

    func leave() async { _ = try? await redis.send(["ZREM", .init(key), .init(id)]) }

    static func shards(for me: String, members: [String], count: Int) -> Set<Int> {
        let sorted = Set(members + [me]).sorted()
        guard let i = sorted.firstIndex(of: me) else { return [] }
        return Set((0..<count).filter { $0 % sorted.count == i })
    }
}

/// One shard's consumer, its per-user chains and its hand-over.
final class ShardRunner: Sendable {
    let shard: Int
    private let consumer: AMQPConsumer
    private let chains = Chains()
    private let loop: Task<Void, Never>
    private let draining = Flag()

    init(shard: Int, worker: Worker, limiter: Limiter) async throws {
        self.shard = shard
        let consumer = try await worker.amqp.consume(
            queue: worker.retry.base.shardQueue(shard), prefetch: UInt16(min(worker.concurrency, Int(UInt16.max))))
        self.consumer = consumer
        let chains = self.chains
        let draining = self.draining
        loop = Task {
            do {
                for try await delivery in consumer {
                    // Handing over: not processed, not acked; closing the channel returns it in order.
                    if draining.isSet { continue }
                    await limiter.acquire()
                    if draining.isSet {
                        limiter.release()
                        continue
                    }
                    let user = delivery.message.properties.headers[WeChatTopology.Header.openID]?.stringValue ?? ""
                    // One user's messages run one after another, in arrival order; users run in parallel.
                    chains.append(user) {
                        await worker.process(delivery)
                        limiter.release()
                    }
                }
            } catch {
                worker.logger.error("consumer ended", metadata: ["worker.shard": "\(shard)", "error": "\(error)"])
            }
        }
    }

    /// Stops taking deliveries, finishes (and acks) the ones in hand, then closes the
    /// channel so that the rest go back to the queue, in order, for the next consumer.
    ///
    /// The consumer stays registered until its channel closes, so that no other worker
    /// becomes active on the shard while this one still has messages of it in hand.
    func release() async {
        draining.set()
        await chains.waitForAll()
        await consumer.close()
        await loop.value
    }
}

/// A one-way flag shared with a task.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}
