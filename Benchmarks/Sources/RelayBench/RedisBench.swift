import ArgumentParser
import Foundation
import Logging
import Redis

/// SET+GET throughput over the Redis module: sequential on one connection,
/// pipelined N deep on one connection, and across the pool with many
/// concurrent callers. Prints `| workload | ops/s |` rows (one op = one command).
struct RedisBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "redis")
    @Option(help: "Redis URL.") var url: String = "redis://127.0.0.1:6379/0"
    @Option(help: "Commands per workload.") var count: Int = 100_000
    @Option(help: "Pool size for the concurrent workload.") var poolSize: Int = 16
    @Option(help: "Concurrent callers for the pool workload.") var callers: Int = 64

    func run() async throws {
        let configuration = try RedisConfiguration(url: url)
        let value = RedisArgument([UInt8](repeating: 0x78, count: 3))
        let one = try await RedisConnection.connect(configuration)

        try await measure("sequential SET/GET, one connection") {
            for i in 0..<(count / 2) {
                _ = try await one.send(["SET", .init("bench:\(i % 1000)"), value])
                _ = try await one.send(["GET", .init("bench:\(i % 1000)")])
            }
            return count / 2 * 2
        }
        for depth in [16, 100] {
            try await measure("pipelined SET/GET, \(depth) deep, one connection") {
                let batch: [[RedisArgument]] = (0..<depth).map { i in
                    i % 2 == 0 ? ["SET", .init("bench:\(i)"), value] : ["GET", .init("bench:\(i - 1)")]
                }
                let rounds = count / depth
                for _ in 0..<rounds { _ = try await one.pipeline(batch) }
                return rounds * depth
            }
        }
        one.close()
        let pool = RedisPool(configuration: configuration, size: poolSize, logger: Logger(label: "bench"))
        try await measure("SET/GET across the pool (\(poolSize) connections), \(callers) concurrent callers") {
            let perCaller = count / callers / 2
            try await withThrowingTaskGroup(of: Void.self) { group in
                for c in 0..<callers {
                    group.addTask {
                        for i in 0..<perCaller {
                            _ = try await pool.send(["SET", .init("bench:\(c):\(i % 100)"), value])
                            _ = try await pool.send(["GET", .init("bench:\(c):\(i % 100)")])
                        }
                    }
                }
                try await group.waitForAll()
            }
            return perCaller * callers * 2
        }
        pool.close()
    }

    func measure(_ name: String, _ body: () async throws -> Int) async throws {
        let start = ContinuousClock.now
        let ops = try await body()
        print(String(format: "| %@ | %.0f |", name, Double(ops) / (ContinuousClock.now - start).seconds))
    }
}
