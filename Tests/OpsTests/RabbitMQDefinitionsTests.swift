import AMQP
import Foundation
import Logging
import RelayCore
import TestSupport
import Testing
import Worker
import Yams
import RelayContract

/// ops/rabbitmq/definitions.json is the topology the ingress and the workers
/// declare (default prefix): same exchanges, queues, arguments and bindings.
@Suite("RabbitMQ definitions")
struct RabbitMQDefinitionsTests {
    /// What the code declares: the ingress's topology plus the workers' retry queues.
    let code = RetryTopology(base: WeChatTopology()).topology

    func definitions() throws -> [String: Any] {
        // JSON is YAML; Yams keeps booleans and integers apart (Foundation's JSON gives NSNumbers).
        try #require(try Yams.load(yaml: Repo.read("ops/rabbitmq/definitions.json")) as? [String: Any])
    }

    /// An AMQP field value as JSON would hold it.
    func json(_ value: AMQPFieldValue) -> String {
        switch value {
        case .string(let s): "\"\(s)\""
        case .int(let i): "\(i)"
        case .bool(let b): "\(b)"
        default: "\(value)"
        }
    }

    func json(_ value: Any) -> String {
        switch value {
        case let s as String: "\"\(s)\""
        case let b as Bool: "\(b)"
        case let i as Int: "\(i)"
        default: "\(value)"
        }
    }

    @Test func theFileDeclaresWhatTheCodeDeclares() throws {
        let d = try definitions()
        let exchanges = d.list("exchanges").compactMap { $0 as? [String: Any] }
        #expect(Set(exchanges.compactMap { $0.string("name") }) == Set(code.exchanges.map(\.name)))
        for e in code.exchanges {
            let file = try #require(exchanges.first { $0.string("name") == e.name })
            #expect(file.string("type") == e.type && (file["durable"] as? Bool) == true, "\(e.name)")
        }
        let queues = d.list("queues").compactMap { $0 as? [String: Any] }
        #expect(Set(queues.compactMap { $0.string("name") }) == Set(code.queues.map(\.name)))
        for q in code.queues {
            let file = try #require(queues.first { $0.string("name") == q.name })
            #expect((file["durable"] as? Bool) == q.durable && (file["auto_delete"] as? Bool) == q.autoDelete, "\(q.name)")
            let fileArguments = file.map("arguments").mapValues { json($0) }
            #expect(fileArguments == q.arguments.mapValues { json($0) }, "\(q.name) arguments")
        }
        let bindings = d.list("bindings").compactMap { $0 as? [String: Any] }
        let fileBindings = Set(bindings.map { "\($0.string("source") ?? "")→\($0.string("destination") ?? "") [\($0.string("routing_key") ?? "")]" })
        #expect(fileBindings == Set(code.bindings.map { "\($0.exchange)→\($0.queue) [\($0.routingKey)]" }))
        for item in exchanges + queues + bindings { #expect(item.string("vhost") == "/") }
    }

    @Test func thePolicyCoversExactlyTheShardQueues() throws {
        let policies = try definitions().list("policies").compactMap { $0 as? [String: Any] }
        let shards = try #require(policies.first { $0.string("name") == "wechat-shards" })
        let definition = shards.map("definition")
        #expect(definition.string("dead-letter-strategy") == "at-least-once")
        #expect(definition.string("overflow") == "reject-publish", "at-least-once dead-lettering needs reject-publish")
        #expect((definition.int("delivery-limit") ?? 0) > 0)
        let regex = try NSRegularExpression(pattern: try #require(shards.string("pattern")))
        func matches(_ q: String) -> Bool { regex.firstMatch(in: q, range: NSRange(q.startIndex..., in: q)) != nil }
        let topology = WeChatTopology()
        for q in code.queues.map(\.name) {
            let isShard = (0..<topology.shardCount).map(topology.shardQueue).contains(q)
            #expect(matches(q) == isShard, "\(q)")
        }
    }

    /// Imports the file into a fresh virtual host of the test broker, then lets
    /// the code declare its topology there: RabbitMQ refuses (406) any queue
    /// whose arguments differ from what the file created.
    @Test(.enabled(if: TestServices.amqpEnabled && (TestServices.environment["WR_SERVICES_DIR"] != nil || TestServices.isCI)))
    func importsIntoABrokerAndTheCodeAgreesWithIt() async throws {
        let servicesDir = try #require(TestServices.environment["WR_SERVICES_DIR"], "ops/test exports WR_SERVICES_DIR")
        let script = Repo.path("ops/services")
        func ctl(_ arguments: String...) async throws -> String { try await runCommand(script, ["rabbitmqctl", servicesDir] + arguments) }
        let vhost = TestServices.unique("defs")
        _ = try await ctl("add_vhost", vhost)
        do {
            try await importAndDeclare(vhost: vhost, ctl: ctl)
        } catch {
            _ = try? await ctl("delete_vhost", vhost)
            throw error
        }
        _ = try await ctl("delete_vhost", vhost)
    }

    func importAndDeclare(vhost: String, ctl: (String...) async throws -> String) async throws {
        _ = try await ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        var d = try definitions()
        func rehome(_ key: String) {
            d[key] = d.list(key).compactMap { $0 as? [String: Any] }.map { item -> [String: Any] in
                var item = item
                item["vhost"] = vhost
                return item
            }
        }
        for key in ["exchanges", "queues", "bindings", "policies"] { rehome(key) }
        d["vhosts"] = [["name": vhost]]
        let file = dir.appendingPathComponent("definitions.json")
        try JSONSerialization.data(withJSONObject: d).write(to: file)
        _ = try await ctl("import_definitions", file.path)

        let listed = try await ctl("list_queues", "-p", vhost, "--no-table-headers", "--silent", "name", "type", "policy")
        let rows = listed.split(separator: "\n").map { $0.split(whereSeparator: { $0 == "\t" || $0 == " " }).map(String.init) }
        let topology = WeChatTopology()
        for n in 0..<topology.shardCount {
            #expect(rows.contains { $0 == [topology.shardQueue(n), "quorum", "wechat-shards"] }, "\(listed)")
        }

        // The code's declarations on top of the imported ones: no 406.
        var url = URLComponents(string: try TestServices.amqpURL())
        url?.percentEncodedPath = "/" + vhost
        var logger = Logger(label: "ops-tests")
        logger.logLevel = .warning
        let amqp = try await AMQPConnection.connect(
            configuration: try AMQPConfiguration(url: try #require(url?.string), connectionName: "ops-tests"), topology: code, logger: logger)
        let info = try await amqp.queueInfo(topology.shardQueue(0))
        #expect(info.name == topology.shardQueue(0))
        await amqp.close()
    }

    /// The production broker set-up end to end: a RabbitMQ with ops/rabbitmq's
    /// rabbitmq.conf and plugins starts; docker-compose's `rabbitmq-topology`
    /// command (the same request as the Kubernetes Job) imports the definitions
    /// through the management API; the code's declarations agree with them; and
    /// the Prometheus endpoint serves, per queue, every RabbitMQ metric the
    /// alerts and the dashboard use.
    @Test(.enabled(if: toolAvailable("/usr/bin/docker-compose") && (TestServices.environment["WR_SERVICES"] != nil || TestServices.isCI)))
    func theComposeImportWorksOnABrokerWithTheProductionConfiguration() async throws {
        let composeText = try await runCommand(
            "/usr/bin/docker-compose",
            ["-f", Repo.path("docker-compose.yml"), "--project-directory", Repo.root.path, "--env-file", Repo.path(".env.example"), "config"])
        let compose = try #require(try Yams.load(yaml: composeText) as? [String: Any])
        let command = try #require(compose.map("services").map("rabbitmq-topology").list("command").first as? String)
        #expect(command.contains("http://rabbitmq:15672/api/definitions"))
        try await PrivateServices.with(opsRabbitMQ: true) { services in
            let management = try #require(services.managementURL)
            // `$$` is how the file escapes `$`; Compose passes a single `$` to the container.
            let local = command
                .replacingOccurrences(of: "$$", with: "$")
                .replacingOccurrences(of: "http://rabbitmq:15672", with: management)
                .replacingOccurrences(of: "/etc/wechatrelay/definitions.json", with: Repo.path("ops/rabbitmq/definitions.json"))
            _ = try await runCommand("/usr/bin/env", ["RABBITMQ_USER=guest", "RABBITMQ_PASSWORD=guest", "/bin/sh", "-c", local], includeStandardError: true)

            var logger = Logger(label: "ops-tests")
            logger.logLevel = .warning
            let amqp = try await AMQPConnection.connect(
                configuration: try AMQPConfiguration(url: services.amqpURL, connectionName: "ops-tests"), topology: code, logger: logger)
            let topology = WeChatTopology()
            #expect(try await amqp.queueInfo(topology.shardQueue(0)).consumerCount == 0)
            await amqp.close()

            // Queue metrics appear once the broker has collected statistics for the new
            // queues (every 5 s by default): no event announces it, so scrape until they
            // are there, at most 30 s.
            let wanted = rabbitMQQueueMetrics.flatMap { name in
                [topology.shardQueue(0), topology.deadLetterQueue].map { "\(name){vhost=\"/\",queue=\"\($0)\"}" }
            }
            let prometheus = try #require(services.prometheusURL) + "/metrics"
            var missing = wanted
            for _ in 0..<60 where !missing.isEmpty {
                let metrics = try await runCommand("/usr/bin/curl", ["-fsS", prometheus])
                missing = wanted.filter { !metrics.contains($0) }
                if !missing.isEmpty { try await Task.sleep(for: .milliseconds(500)) }
            }
            #expect(missing.isEmpty, "not exported: \(missing)")
        }
    }
}
