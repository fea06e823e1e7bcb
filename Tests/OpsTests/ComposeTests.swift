import AMQP
import Foundation
import Redis
import TestSupport
import Testing
import Yams

/// docker-compose.yml, validated by Debian's docker-compose (no Docker engine
/// needed for `config`) and checked against the contract.
@Suite("docker-compose.yml", .enabled(if: toolAvailable("/usr/bin/docker-compose")))
struct ComposeTests {
    func compose(_ arguments: [String], envFile: String = Repo.path(".env.example")) async throws -> String {
        try await runCommand(
            "/usr/bin/docker-compose",
            ["-f", Repo.path("docker-compose.yml"), "--project-directory", Repo.root.path, "--env-file", envFile] + arguments,
            includeStandardError: true)
    }

    /// The file with every profile, as docker-compose resolves it (.env.example's values).
    func resolved() async throws -> [String: Any] {
        let text = try await compose(["--profile", "dev", "--profile", "observability", "config"])
        return try #require(try Yams.load(yaml: text) as? [String: Any])
    }

    /// Port entries as `published:target` text, whichever syntax docker-compose printed.
    func portSpecs(_ entries: [Any]) -> [String] {
        entries.map { entry in
            guard let long = entry as? [String: Any] else { return "\(entry)" }
            return "\(long.int("published") ?? 0):\(long.int("target") ?? 0)"
        }
    }

    @Test func validatesWithTheExampleEnvironment() async throws {
        _ = try await compose(["config", "-q"])
        _ = try await compose(["--profile", "dev", "--profile", "observability", "config", "-q"])
    }

    @Test func aMissingSecretIsAnErrorThatNamesIt() async throws {
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let env = try Repo.read(".env.example").split(separator: "\n").filter { !$0.hasPrefix("TOKEND_SECRET=") }
        let path = dir.appendingPathComponent("env").path
        try env.joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
        let error = await #expect(throws: ServiceScriptError.self) { try await compose(["config", "-q"], envFile: path) }
        #expect(error?.message.contains("set TOKEND_SECRET in .env") == true)
    }

    @Test func servicesCommandsPortsAndVariablesMatchTheContract() async throws {
        let services = try await resolved().map("services")
        #expect(
            Set(services.keys) == [
                "rabbitmq", "rabbitmq-topology", "redis", "tokend", "ingress", "worker", "nginx", "sim", "prometheus", "grafana",
                // profile `cluster` (docker-compose 1.29 lists every profile's services)
                "rabbitmq-2", "rabbitmq-3", "rabbitmq-cluster", "redis-replica", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3",
            ])
        let relay: [String: (executable: String, portVariable: String, probe: String)] = [
            "ingress": (Contract.ingress, "HTTP_PORT", "/readyz"),
            "worker": (Contract.worker, "METRICS_PORT", "/readyz"),
            "tokend": (Contract.tokend, "HTTP_PORT", "/readyz"),
            "sim": (Contract.sim, "HTTP_PORT", "/healthz"),
        ]
        for (name, expected) in relay {
            let service = services.map(name)
            let command = service.list("command").compactMap { $0 as? String }
            #expect(command.first == expected.executable, "\(name): command \(command)")
            #expect(service.string("image") == "wechatrelay:latest", "\(name): one image for every executable")
            #expect(service.map("build").string("dockerfile") == "ops/docker/Dockerfile")
            let environment = service.map("environment")
            try checkEnvironment(Set(environment.keys), executable: expected.executable, in: "docker-compose \(name)")
            let port = try #require(environment.int(expected.portVariable), "\(name) sets \(expected.portVariable)")
            #expect(port == Contract.defaultPorts[expected.executable], "\(name) listens on the contract's default port")
            let probe = service.map("healthcheck").list("test").compactMap { $0 as? String }.joined(separator: " ")
            #expect(probe.contains("http://127.0.0.1:\(port)\(expected.probe)"), "\(name): health check \(probe)")
            let published = service.list("expose").map { "\($0)" } + portSpecs(service.list("ports"))
            #expect(published.contains { $0.contains("\(port)") }, "\(name) exposes \(port): \(published)")
        }
        #expect(services.map("ingress").map("deploy").int("replicas") == 2)
        #expect(services.map("worker").map("deploy").int("replicas") == 3)
        #expect(services.map("worker").map("environment").string("TOKEND_URL") == "http://tokend:8081")
        #expect(services.map("sim").list("profiles").compactMap { $0 as? String } == ["dev"])
        for name in ["prometheus", "grafana"] {
            #expect(services.map(name).list("profiles").compactMap { $0 as? String } == ["observability"])
        }
        for name in ["rabbitmq", "redis", "tokend", "ingress", "worker", "nginx"] {
            #expect(services.map(name)["profiles"] == nil, "\(name) runs without a profile")
        }
        // nginx on 80 (and 443) in front of the ingress; the broker with management; Redis with AOF.
        let nginxPorts = portSpecs(services.map("nginx").list("ports"))
        #expect(nginxPorts.contains { $0.hasPrefix("80:80") } && nginxPorts.contains { $0.hasPrefix("443:443") }, "\(nginxPorts)")
        #expect(services.map("nginx").map("depends_on").map("ingress").string("condition") == "service_healthy")
        #expect(services.map("rabbitmq").string("image")?.contains("management") == true)
        #expect(services.map("redis").list("command").map { "\($0)" }.joined(separator: " ").contains("--appendonly yes"))
        // Start order: the broker's topology before the ingress and the workers.
        for name in ["ingress", "worker"] {
            #expect(services.map(name).map("depends_on").map("rabbitmq-topology").string("condition") == "service_completed_successfully")
        }
        // Every file mounted from the repository exists.
        for (name, value) in services {
            for volume in (value as? [String: Any])?.list("volumes") ?? [] {
                guard let spec = volume as? String, spec.hasPrefix("/") else { continue }
                let source = String(spec.split(separator: ":")[0])
                #expect(FileManager.default.fileExists(atPath: source), "\(name) mounts \(source), which does not exist")
            }
        }
    }

    /// #18: `--profile cluster` with the cluster lines of .env.example uncommented: three
    /// RabbitMQ nodes of a supported series (4.x), Redis with a replica and three sentinels,
    /// and the relay's AMQP_URL and REDIS_URL naming them (parsed as the services parse them).
    @Test func theClusterProfileAddsTheNodesAndPointsTheRelayAtThem() async throws {
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let clusterLines = ["RABBITMQ_COOKIE", "RABBITMQ_MORE_NODES", "REDIS_KIND", "REDIS_HOSTS", "REDIS_DB"]
        let env = try Repo.read(".env.example").split(separator: "\n", omittingEmptySubsequences: false).map { line in
            clusterLines.contains { line.hasPrefix("#\($0)=") } ? String(line.dropFirst()) : String(line)
        }
        let path = dir.appendingPathComponent("env").path
        try env.joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
        let text = try await compose(["--profile", "cluster", "config"], envFile: path)
        let services = try #require(try Yams.load(yaml: text) as? [String: Any]).map("services")
        for name in ["rabbitmq-2", "rabbitmq-3", "rabbitmq-cluster", "redis-replica", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3"] {
            #expect(services.map(name).list("profiles").compactMap { $0 as? String } == ["cluster"], "\(name)")
        }
        for name in ["rabbitmq", "rabbitmq-2", "rabbitmq-3"] {
            #expect(services.map(name).string("image")?.hasPrefix("rabbitmq:4.") == true, "\(name) runs a supported series")
        }
        for name in ["ingress", "worker"] {
            let url = try #require(services.map(name).map("environment").string("AMQP_URL"))
            let amqp = try AMQPConfiguration(url: url)
            #expect(amqp.addresses.map(\.host) == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"], "\(name): \(amqp.redactedURL)")
        }
        for name in ["worker", "tokend"] {
            let url = try #require(services.map(name).map("environment").string("REDIS_URL"))
            let redis = try RedisConfiguration(url: url)
            #expect(redis.endpoint == .sentinel(sentinels: (1...3).map { .init(host: "sentinel-\($0)", port: 26379) }, master: "mymaster"), "\(name)")
            #expect(redis.password != nil && redis.waitReplicas == 1)
        }
        #expect(Repo.exists("ops/rabbitmq/cluster.conf"))
    }

    @Test func theExampleEnvironmentNamesOnlyKnownVariables() throws {
        let names = try Repo.read(".env.example").split(separator: "\n")
            .map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty && !$0.hasPrefix("#") }
            .compactMap { $0.split(separator: "=", maxSplits: 1).first.map(String.init) }
        let composeOnly: Set<String> = [
            "RABBITMQ_USER", "RABBITMQ_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
            "RABBITMQ_COOKIE", "RABBITMQ_MORE_NODES", "REDIS_KIND", "REDIS_HOSTS", "REDIS_DB",
        ]
        for name in names {
            #expect(Contract.variables[name] != nil || composeOnly.contains(name), "\(name) in .env.example is unknown")
        }
        let compose = try Repo.read("docker-compose.yml")
        for name in names {
            #expect(compose.contains("${\(name)"), "\(name) in .env.example is not used by docker-compose.yml")
        }
    }
}
