import Foundation
import RelayCore
import TestSupport
import Testing
import Yams
import RelayContract

/// ops/prometheus, ops/grafana and docs/operations.md: valid for their tools,
/// and every metric they use is one the code (or RabbitMQ) exports.
@Suite("Prometheus, Grafana and the runbook")
struct ObservabilityTests {
    /// Metric names our executables register (`label: "…"` in their sources).
    func exportedMetrics() throws -> Set<String> {
        try Repo.captures(of: #"label: "([a-z_]+)""#, inModules: ["Ingress", "Worker", "Tokend"])
    }

    func checkKnown(_ expression: String, in place: String) throws {
        let exported = try exportedMetrics()
        for name in metricNames(in: expression) {
            var base = name
            for suffix in ["_bucket", "_count", "_sum"] where base.hasSuffix(suffix) && !exported.contains(base) {
                base = String(base.dropLast(suffix.count))
            }
            #expect(exported.contains(base) || rabbitMQQueueMetrics.contains(base), "\(place): \(name) is not exported by the code")
        }
    }

    func alerts() throws -> [[String: Any]] {
        let doc = try #require(try Yams.load(yaml: Repo.read("ops/prometheus/alerts.yml")) as? [String: Any])
        return doc.list("groups").compactMap { $0 as? [String: Any] }.flatMap { $0.list("rules").compactMap { $0 as? [String: Any] } }
    }

    @Test func alertsUseExportedMetricsAndTheTopologysQueueNames() throws {
        let rules = try alerts()
        #expect(rules.count >= 8)
        let topology = WeChatTopology()
        for rule in rules {
            let expr = try #require(rule.string("expr"))
            try checkKnown(expr, in: rule.string("alert") ?? "?")
            #expect(rule.map("labels").string("severity") != nil)
        }
        let all = rules.compactMap { $0.string("expr") }.joined(separator: "\n")
        #expect(all.contains("queue=\"\(topology.deadLetterQueue)\""))
        #expect(all.contains(#"queue=~"wechat\\.inbound\\.[0-9]+""#))
        // The issue's five: backlog, dead letters, token refresh, 503s, reply latency.
        for needed in ["rabbitmq_queue_messages_ready", "rabbitmq_queue_messages{", "tokend_upstream_errors_total", "outcome=\"unavailable\"", "wechat_worker_end_to_end_seconds_bucket"] {
            #expect(all.contains(needed), "no alert on \(needed)")
        }
    }

    @Test(.enabled(if: toolAvailable("/usr/bin/promtool")))
    func promtoolAcceptsTheConfigAndTheAlertUnitTestsPass() async throws {
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        // The container path of the rules file, made local.
        let config = try Repo.read("ops/prometheus/prometheus.yml").replacingOccurrences(of: "/etc/prometheus/alerts.yml", with: "alerts.yml")
        try config.write(to: dir.appendingPathComponent("prometheus.yml"), atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(atPath: Repo.path("ops/prometheus/alerts.yml"), toPath: dir.appendingPathComponent("alerts.yml").path)
        let checked = try await runCommand("/usr/bin/promtool", ["check", "config", dir.appendingPathComponent("prometheus.yml").path], includeStandardError: true)
        #expect(checked.contains("SUCCESS"))
        let tested = try await runCommand("/usr/bin/promtool", ["test", "rules", Repo.path("ops/prometheus/alerts.test.yml")], includeStandardError: true)
        #expect(tested.contains("SUCCESS"))
    }

    @Test func theScrapeConfigTargetsTheContractsPorts() throws {
        let doc = try #require(try Yams.load(yaml: Repo.read("ops/prometheus/prometheus.yml")) as? [String: Any])
        let jobs = doc.list("scrape_configs").compactMap { $0 as? [String: Any] }
        for (job, port) in [("wechat-ingress", 8080), ("wechat-worker", 9100), ("wechat-tokend", 8081)] {
            let config = try #require(jobs.first { $0.string("job_name") == job })
            let sd = try #require(config.list("dns_sd_configs").first as? [String: Any])
            #expect(sd.int("port") == port && port == Contract.defaultPorts[job])
        }
    }

    @Test func theDashboardParsesAndUsesExportedMetrics() throws {
        let dashboard = try #require(
            try JSONSerialization.jsonObject(with: Data(Repo.read("ops/grafana/dashboards/wechatrelay.json").utf8)) as? [String: Any])
        let datasource = try #require(
            try Yams.load(yaml: Repo.read("ops/grafana/provisioning/datasources/prometheus.yml")) as? [String: Any])
        let uid = (datasource.list("datasources").first as? [String: Any])?.string("uid")
        let panels = dashboard.list("panels").compactMap { $0 as? [String: Any] }
        #expect(panels.count >= 8)
        for panel in panels {
            #expect(panel.map("datasource").string("uid") == uid, "\(panel.string("title") ?? "")")
            let targets = panel.list("targets").compactMap { $0 as? [String: Any] }
            #expect(!targets.isEmpty)
            for target in targets { try checkKnown(try #require(target.string("expr")), in: panel.string("title") ?? "?") }
        }
        let provider = try #require(try Yams.load(yaml: Repo.read("ops/grafana/provisioning/dashboards/wechatrelay.yml")) as? [String: Any])
        #expect((provider.list("providers").first as? [String: Any])?.map("options").string("path") == "/var/lib/grafana/dashboards")
    }

    @Test func theRunbookExplainsEveryAlert() throws {
        let runbook = try Repo.read("docs/operations.md")
        for rule in try alerts() {
            let name = try #require(rule.string("alert"))
            #expect(runbook.contains("`\(name)`"), "docs/operations.md does not explain \(name)")
        }
    }
}
