import Foundation
import TestSupport
import Testing

/// #16: a short chaos run of the real stack — every fault once in about two minutes — must
/// report nothing lost, reordered or duplicated beyond the uncertain sends, no reply to a
/// refused push, and session counters in step (`wechat-sim chaos` exits 0 only then). The long
/// run is `ops/bench chaos`.
@Suite("Chaos", .serialized, .enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI), .timeLimit(.minutes(10)))
struct ChaosTests {
    @Test func everyFaultOnceKeepsTheGuarantees() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "ops/test exports WR_BIN_DIR")
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let output = try await runCommand(
            "/usr/bin/env",
            ["-u", "AMQP_URL", "-u", "REDIS_URL", bin + "/wechat-sim", "chaos", "--seed", "16", "--duration", "120", "--users", "30",
             "--rate", "15", "--repo", Repo.root.path, "--bin", bin, "--dir", dir.path + "/run"],
            includeStandardError: true)
        #expect(output.contains("invariants hold"), "\(output)")
        for fault in ["kill-worker", "pause-worker", "restart-rabbitmq", "restart-redis", "memory-alarm", "api-errors",
                      "token-rejections", "api-timeouts", "slow-api", "handover-storm", "slow-ingress"] {
            #expect(output.contains("\n\(fault) "), "no row for \(fault): \(output)")
        }
        #expect(!output.contains("faults that failed"), "\(output)")
    }

    /// #18: the stack on a three-node RabbitMQ cluster and Redis under Sentinel. The node that
    /// leads most shard queues stops (publishing and consuming move to the other nodes); the node
    /// the ingress replicas are connected to stops (they reconnect elsewhere); the Redis primary
    /// dies (the sentinels promote the replica; the workers follow); a worker is killed. Each
    /// node comes back, rejoins, and the queues have all their members again (the fault fails
    /// otherwise). Nothing lost, reordered or duplicated beyond the uncertain sends.
    @Test func aClusterAndSentinelLoseNodesAndKeepTheGuarantees() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "ops/test exports WR_BIN_DIR")
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let output = try await runCommand(
            "/usr/bin/env",
            ["-u", "AMQP_URL", "-u", "REDIS_URL", bin + "/wechat-sim", "chaos", "--seed", "18", "--duration", "80", "--users", "30",
             "--rate", "15", "--cluster", "--sentinel", "--faults", "stop-leader-node,stop-ingress-node,redis-failover,kill-worker",
             "--repo", Repo.root.path, "--bin", bin, "--dir", dir.path + "/run"],
            includeStandardError: true)
        #expect(output.contains("invariants hold"), "\(output)")
        for fault in ["stop-leader-node", "stop-ingress-node", "redis-failover", "kill-worker"] {
            #expect(output.contains("\n\(fault) "), "no row for \(fault): \(output)")
        }
        #expect(!output.contains("faults that failed"), "\(output)")
    }
}
