import AMQP
import ArgumentParser
import Logging
import Foundation
import Synchronization
import WeChat
import RelayContract
import RelayAMQP

struct AMQPOptions: ParsableArguments {
    @Option(help: "Broker URL.") var url: String = "amqp://guest:guest@127.0.0.1:5672/%2F"
    @Option(help: "Queue (durable, declared if missing).") var queue: String = "bench.amqp"
    @Option(help: "Messages.") var count: Int = 100_000

    func connect() async throws -> AMQPConnection {
        var logger = Logger(label: "relay-bench")
        logger.logLevel = .warning
        return try await AMQPConnection.connect(
            configuration: AMQPConfiguration(url: url, connectionName: "relay-bench"),
            topology: AMQPTopology(queues: [.init(queue)]), logger: logger)
    }
}

/// Publish-with-confirm throughput of 1 KiB persistent messages with N in flight.
struct AMQPPublishBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "amqp-publish")
    @OptionGroup var options: AMQPOptions
    @Option(help: "Publishes awaiting their confirm at once (concurrent publishers).") var inflight: Int = 100

    func run() async throws {
        let amqp = try await options.connect()
        let message = AMQPMessage(
            body: [UInt8](repeating: UInt8(ascii: "x"), count: 1024),
            properties: AMQPProperties(contentType: "application/xml", persistent: true))
        let remaining = Countdown(options.count)
        let queue = options.queue
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<inflight {
                group.addTask {
                    while remaining.take() {
                        try await amqp.publish(message, exchange: "", routingKey: queue)
                    }
                }
            }
            try await group.waitForAll()
        }
        print(String(format: "%.0f", Double(options.count) / (ContinuousClock.now - start).seconds))
        await amqp.close()
    }
}

/// Consume + ack throughput with a given prefetch.
struct AMQPConsumeBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "amqp-consume")
    @OptionGroup var options: AMQPOptions
    @Option(help: "basic.qos prefetch count.") var prefetch: UInt16 = 100

    func run() async throws {
        let amqp = try await options.connect()
        let consumer = try await amqp.consume(queue: options.queue, prefetch: prefetch)
        var n = 0
        let start = ContinuousClock.now
        for try await delivery in consumer {
            try delivery.ack()
            n += 1
            if n == options.count { break }
        }
        print(String(format: "%.0f", Double(n) / (ContinuousClock.now - start).seconds))
        await amqp.close()
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// Hands out a fixed number of work items to concurrent tasks.
final class Countdown: Sendable {
    private let left: Atomic<Int>
    init(_ n: Int) { left = Atomic(n) }
    /// `true` while items remain (and takes one).
    func take() -> Bool { left.subtract(1, ordering: .relaxed).oldValue > 0 }
}

/// Empties queues between benchmark rows, so the broker does not slow down under a growing backlog.
struct AMQPPurge: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "amqp-purge")
    @Option(help: "Broker URL.") var url: String = "amqp://guest:guest@127.0.0.1:5672/%2F"
    @Argument(help: "Queues to purge.") var queues: [String]

    func run() async throws {
        let amqp = try await AMQPConnection.connect(configuration: AMQPConfiguration(url: url), logger: Logger(label: "bench"))
        var purged = 0
        for q in queues { purged += try await amqp.purge(queue: q) }
        await amqp.close()
        print(purged)
    }
}

/// Publishes messages straight into the shard queues, as the ingress would, for `ops/bench worker`.
struct WorkerPreload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker-preload")
    @Option(help: "Broker URL.") var url: String = "amqp://guest:guest@127.0.0.1:5672/%2F"
    @Option var count: Int = 100_000
    @Option var users: Int = 1000
    @Flag(help: "Give each message the signed-query header of a plaintext push (one Redis round trip more per message).")
    var signedQuery = false

    func run() async throws {
        let topology = WeChatTopology()
        let signed = signedQuery
        let amqp = try await AMQPConnection.connect(
            configuration: AMQPConfiguration(url: url), topology: topology.inbound, logger: Logger(label: "bench"))
        let base = UInt64.random(in: 1...(1 << 40)) << 20
        let next = Countdown(count)
        let index = AtomicCounter()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<200 {
                group.addTask {
                    while next.take() {
                        let i = index.next()
                        let user = "oWork\(String(format: "%06d", i % users))"
                        var x = XMLBuilder()
                        x.header(to: "gh_bench", from: user, createTime: 1_700_000_000, msgType: "text")
                        x.cdata("Content", "帮助"); x.raw("MsgId", String(base + UInt64(i)))
                        var headers: AMQPTable = [
                            WeChatTopology.Header.openID: .string(user), WeChatTopology.Header.msgType: "text",
                            WeChatTopology.Header.receivedAtMs: .int(Int64(Date().timeIntervalSince1970 * 1000)),
                        ]
                        if signed { headers[WeChatTopology.Header.signedQuery] = .string("1700000000:\(base + UInt64(i)):bench") }
                        try await amqp.publish(
                            AMQPMessage(x.finish(), properties: AMQPProperties(contentType: "application/xml", headers: headers, messageID: "\(user):\(base + UInt64(i))")),
                            exchange: topology.inboundExchange, routingKey: topology.routingKey(appID: "wxbench", openID: user))
                    }
                }
            }
            try await group.waitForAll()
        }
        await amqp.close()
    }
}

final class AtomicCounter: Sendable {
    private let value = Atomic<Int>(-1)
    func next() -> Int { value.wrappingAdd(1, ordering: .relaxed).newValue }
}
