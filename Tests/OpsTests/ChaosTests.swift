import Foundation
import TestSupport
import Testing

/// #16: a short chaos run of the real stack — every fault once in about two minutes — must
/// report nothing lost, reordered or duplicated beyond the uncertain sends, no reply to a
/// refused push, and session counters in step (`wechat-sim chaos` exits 0 only then). The long
/// run is `ops/bench chaos`.
@Suite("Chaos", .enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI), .timeLimit(.minutes(10)))
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
}
