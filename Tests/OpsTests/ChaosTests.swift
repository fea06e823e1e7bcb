import Foundation
import TestSupport
import Testing

/// Short chaos runs of the real stack (`wechat-sim chaos` exits 0 only when nothing was lost,
/// reordered or duplicated beyond the uncertain sends, no refused push was answered and the
/// session counters are in step). The long run is `ops/bench chaos`.
@Suite("Chaos", .serialized, .enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI), .timeLimit(.minutes(10)))
struct ChaosTests {
    /// #16: every fault of the one-node stack once, in about two minutes.
    @Test func everyFaultOnceKeepsTheGuarantees() async throws {
        try await chaos(
            ["--seed", "16", "--duration", "120"],
            expecting: ["kill-worker", "pause-worker", "restart-rabbitmq", "restart-redis", "memory-alarm", "api-errors",
                        "token-rejections", "api-timeouts", "slow-api", "handover-storm", "slow-ingress"])
    }

    /// #18: the stack on a three-node RabbitMQ cluster and Redis under Sentinel. The node that
    /// leads most shard queues stops (publishing and consuming move to the other nodes); the node
    /// the ingress replicas are connected to stops (they reconnect elsewhere); the Redis primary
    /// dies (the sentinels promote a replica; the workers follow); a worker is killed. Each
    /// node comes back, rejoins, and the queues have all their members again (the fault fails
    /// otherwise).
    @Test func aClusterAndSentinelLoseNodesAndKeepTheGuarantees() async throws {
        let faults = ["stop-leader-node", "stop-ingress-node", "redis-failover", "kill-worker"]
        try await chaos(
            ["--seed", "18", "--duration", "80", "--cluster", "--sentinel", "--faults", faults.joined(separator: ",")], expecting: faults)
    }

    /// #19: passive-first replies (the ingresses wait 1 s, the workers offer each reply first):
    /// every reply goes out exactly one way — in the HTTP response or through the API — in each
    /// user's order, while workers are killed and paused, RabbitMQ restarts and an ingress stalls.
    @Test func passiveRepliesKeepTheGuaranteesThroughFaults() async throws {
        let faults = ["kill-worker", "pause-worker", "restart-rabbitmq", "slow-ingress", "api-errors"]
        let output = try await chaos(["--seed", "19", "--duration", "75", "--passive", "--faults", faults.joined(separator: ",")], expecting: faults)
        // Most replies went out in the HTTP response (seed 19: 748 of 885), not all through the API.
        let passive = output.split(separator: "\n").first { $0.hasPrefix("replies in the HTTP response (passive): ") }
        let count = passive.flatMap { Int($0.dropFirst("replies in the HTTP response (passive): ".count).prefix { $0.isNumber }) } ?? 0
        #expect(count > 0, "\(output)")
    }

    /// Runs `wechat-sim chaos` (30 users, 15 pushes/s, its own brokers) with `arguments`; the
    /// invariants must hold, every fault in `faults` must have its row and none may have failed.
    @discardableResult
    private func chaos(_ arguments: [String], expecting faults: [String]) async throws -> String {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "ops/test exports WR_BIN_DIR")
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let output = try await runCommand(
            "/usr/bin/env",
            ["-u", "AMQP_URL", "-u", "REDIS_URL", bin + "/wechat-sim", "chaos", "--users", "30", "--rate", "15"] + arguments
                + ["--repo", Repo.root.path, "--bin", bin, "--dir", dir.path + "/run"],
            includeStandardError: true)
        #expect(output.contains("invariants hold"), "\(output)")
        for fault in faults { #expect(output.contains("\n\(fault) "), "no row for \(fault): \(output)") }
        #expect(!output.contains("faults that failed"), "\(output)")
        return output
    }
}
