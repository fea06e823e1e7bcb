import AsyncHTTPClient
import DevStack
import Foundation
import Synchronization

/// The processes of a chaos run, and the faults that act on them.
final class Stack: Sendable {
    let run: ChaosRun
    let apiPort: Int
    let ports: [Int]
    let ingressURLs: [String]
    private let state = Mutex(State())

    private struct State {
        var amqpURL = ""
        var redisURL = ""
        var children: [ChildProcess] = []
        var workers: [(child: ChildProcess, port: Int)] = []
        var ingresses: [ChildProcess] = []
        var spare: [Int] = []
    }

    var servicesDirectory: String { run.settings.directory + "/services" }
    var logs: String { run.settings.directory + "/logs" }

    init(run: ChaosRun, apiPort: Int, ports: [Int]) {
        self.run = run
        self.apiPort = apiPort
        self.ports = ports
        ingressURLs = (0..<run.settings.ingresses).map { "http://127.0.0.1:\(ports[1 + $0])/wechat" }
    }

    private var tokendPort: Int { ports[0] }

    // MARK: - Start and stop

    func start() async throws {
        let s = run.settings
        let shape = (s.cluster ? ["--cluster"] : []) + (s.sentinel ? ["--sentinel"] : [])
        let out = try await run.host.shielded {
            try await self.run.command(s.repository + "/ops/services", ["start", self.servicesDirectory] + shape, log: "services.log")
        }
        guard let (amqp, redis) = brokerURLs(fromServicesOutput: out) else {
            throw ChaosError(message: "ops/services start printed no AMQP_URL and REDIS_URL (\(logs)/services.log)")
        }
        let firstWorkerPort = 1 + s.ingresses
        state.withLock {
            $0.amqpURL = amqp
            $0.redisURL = redis
            $0.spare = Array(ports[(firstWorkerPort + s.workers)...])
        }
        let rules = s.directory + "/rules.yaml"
        try """
        # Each reply echoes its push and the messages counted so far (chaos run).
        rules:
          - match: { type: text }
            reply: { text: "{{message.Content}} n={{session.messages}}" }
        """.write(toFile: rules, atomically: true, encoding: .utf8)
        run.progress("chaos: RabbitMQ and Redis up; starting tokend, \(s.ingresses) ingress, \(s.workers) workers")
        let tokend = try await spawn("tokend", "wechat-tokend", [
            "WECHAT_SECRET": run.secret, "WECHAT_API_URL": "http://127.0.0.1:\(apiPort)", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "\(tokendPort)",
        ])
        try await waitReady(tokend, "http://127.0.0.1:\(tokendPort)/readyz")
        var ready: [(ChildProcess, String)] = []
        for i in 0..<s.ingresses {
            let port = ports[1 + i]
            var env = ["HTTP_HOST": "127.0.0.1", "HTTP_PORT": "\(port)"]
            // 1 s: with the run's 6 s claim lease a worker waits for a verdict at most 3 s.
            if s.passive { env["INGRESS_REPLY_WAIT"] = "1" }
            // The workers' reply mode (one exported in the shell must not reach the ingress alone).
            env["WORKER_REPLY_MODE"] = s.passive ? "passive-first" : "customer-service"
            let ingress = try await spawn("ingress-\(i + 1)", "wechat-ingress", env)
            state.withLock { $0.ingresses.append(ingress) }
            ready.append((ingress, "http://127.0.0.1:\(port)/readyz"))
        }
        for i in 0..<s.workers {
            let port = ports[firstWorkerPort + i]
            let child = try await startWorker(port: port)
            state.withLock { $0.workers.append((child, port)) }
            ready.append((child, "http://127.0.0.1:\(port)/readyz"))
        }
        for (child, url) in ready { try await waitReady(child, url) }
        run.progress("chaos: the stack is up (logs in \(logs))")
    }

    /// Stops every process (the last started first), then the brokers.
    func stop() async {
        let children = state.withLock { $0.children }
        for child in children.reversed() where child.termination == nil { _ = await child.stop(grace: .seconds(20)) }
        if FileManager.default.fileExists(atPath: servicesDirectory + "/state") {
            _ = try? await run.command(run.settings.repository + "/ops/services", ["stop", servicesDirectory], log: "services.log")
        }
    }

    private func environment(_ extra: [String: String]) -> [String: String] {
        let (amqp, redis) = state.withLock { ($0.amqpURL, $0.redisURL) }
        return ProcessInfo.processInfo.environment.merging([
            "WECHAT_APPID": run.appID, "WECHAT_TOKEN": run.token, "AMQP_URL": amqp, "REDIS_URL": redis,
            "WECHAT_QUEUE_PREFIX": run.prefix, "TOKEND_SECRET": "chaos-bearer", "LOG_LEVEL": "info",
        ]) { $1 }.merging(extra) { $1 }
    }

    private func spawn(_ name: String, _ executable: String, _ extra: [String: String]) async throws -> ChildProcess {
        let child = ChildProcess(
            name: name, executable: run.settings.binaries + "/" + executable, arguments: [], environment: environment(extra),
            directory: run.settings.directory, logPath: "\(logs)/\(name).log")
        state.withLock { $0.children.append(child) }
        guard await run.host.start(child) != nil else {
            throw ChaosError(message: "cannot start \(name): \(child.termination.map { "\($0)" } ?? "?")")
        }
        return child
    }

    private func startWorker(port: Int) async throws -> ChildProcess {
        let amqp = state.withLock { $0.amqpURL }
        return try await spawn("worker-\(run.nextWorkerNumber())", "wechat-worker", [
            // A short heartbeat, so that the broker drops a paused worker within seconds.
            "AMQP_URL": amqp + (amqp.contains("?") ? "&" : "?") + "heartbeat=2",
            "METRICS_PORT": "\(port)", "WECHAT_API_URL": "http://127.0.0.1:\(apiPort)", "TOKEND_URL": "http://127.0.0.1:\(tokendPort)",
            "WORKER_RULES": run.settings.directory + "/rules.yaml", "WORKER_CLAIM_LEASE": "6", "WORKER_CONCURRENCY": "16",
            "WORKER_REPLY_MODE": run.settings.passive ? "passive-first" : "customer-service",
        ])
    }

    private func waitReady(_ child: ChildProcess, _ url: String) async throws {
        let deadline = ContinuousClock.now + .seconds(90)
        while ContinuousClock.now < deadline {
            if let t = child.termination { throw ChaosError(message: "\(child.name) exited (\(t)):\n\(child.logTail())") }
            if let r = try? await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(1)), r.status == .ok { return }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw ChaosError(message: "\(child.name) not ready at \(url) after 90 s:\n\(child.logTail())")
    }

    // MARK: - Faults

    /// `ops/services ARGUMENTS[0] DIR ARGUMENTS[1...]` on the run's brokers.
    func services(_ arguments: [String]) async throws {
        let args = [arguments[0], servicesDirectory] + arguments.dropFirst()
        _ = try await run.command(run.settings.repository + "/ops/services", args, log: "services.log")
    }

    // MARK: - Cluster and Sentinel faults

    /// The quorum queues of the run: the eight shard queues (the default shard count) and the dead letters.
    private var shardQueues: [String] { (0..<8).map { "\(run.prefix).inbound.\($0)" } + ["\(run.prefix).dead.q"] }

    /// `rabbitmqctl list_queues name leader members online` on `node`, for the shard queues.
    private func shardQueueStates(askingNode node: Int) async throws -> [(name: String, leader: String, members: Int, online: Int)] {
        let out = try await run.command(
            run.settings.repository + "/ops/services",
            ["rabbitmqctl", servicesDirectory, "--node", "\(node)", "list_queues", "-q", "--formatter", "json",
             "name", "leader", "members", "online"], log: "services.log")
        guard let data = out.data(using: .utf8),
            let rows = try? JSONSerialization.jsonObject(with: data) as? [[String: Any]]
        else { throw ChaosError(message: "cannot read rabbitmqctl list_queues: \(out.prefix(300))") }
        let wanted = Set(shardQueues)
        return rows.compactMap { row in
            guard let name = row["name"] as? String, wanted.contains(name) else { return nil }
            return (name, row["leader"] as? String ?? "", (row["members"] as? [Any])?.count ?? 0, (row["online"] as? [Any])?.count ?? 0)
        }
    }

    /// The node (1…3) leading most shard queues.
    func nodeLeadingMostShards() async throws -> Int {
        let states = try await shardQueueStates(askingNode: 1)
        let counts = Dictionary(grouping: states, by: \.leader).mapValues(\.count)
        guard let leader = counts.max(by: { $0.value < $1.value })?.key else { throw ChaosError(message: "no shard queue has a leader") }
        return try nodeNumber("RMQ_NODE_", leader)
    }

    /// The node (1…3) the first ingress replica's AMQP connection is on (by the node's AMQP port).
    func nodeOfIngresses() async throws -> Int {
        let out = try await run.command(
            run.settings.repository + "/ops/services",
            ["rabbitmqctl", servicesDirectory, "list_connections", "-q", "--formatter", "json", "port", "client_properties"], log: "services.log")
        guard let data = out.data(using: .utf8), let rows = try? JSONSerialization.jsonObject(with: data) as? [[String: Any]] else {
            throw ChaosError(message: "cannot read rabbitmqctl list_connections: \(out.prefix(300))")
        }
        for row in rows where "\(row["client_properties"] ?? "")".contains("wechat-ingress") {
            if let port = row["port"] as? Int, let node = try? nodeNumber("AMQP_PORT_", "\(port)") { return node }
        }
        throw ChaosError(message: "no ingress connection found: \(out.prefix(300))")
    }

    /// Which node's `field` in the services' state file (`RMQ_NODE_<n>=…`, `AMQP_PORT_<n>=…`) is `value`.
    private func nodeNumber(_ field: String, _ value: String) throws -> Int {
        let state = try String(contentsOfFile: servicesDirectory + "/state", encoding: .utf8)
        for line in state.split(separator: "\n") where line.hasPrefix(field) {
            let kv = line.dropFirst(field.count).split(separator: "=")
            if kv.count == 2, let n = Int(kv[0]), kv[1] == value { return n }
        }
        throw ChaosError(message: "\(value) is none of the cluster's nodes")
    }

    /// Stops RabbitMQ node `node`, waits, starts it again and waits until the shard queues
    /// have every member back online.
    func stopNode(_ node: Int, for pause: Duration) async throws {
        run.progress("chaos: stopping RabbitMQ node \(node)")
        try await services(["rabbitmq-stop", "\(node)"])
        try await Task.sleep(for: pause)
        try await services(["rabbitmq-start", "\(node)"])
        try await waitUntilQueuesInSync()
    }

    /// Every shard queue has all three members online (a node that came back has caught up).
    func waitUntilQueuesInSync() async throws {
        let deadline = ContinuousClock.now + .seconds(90)
        var last = ""
        while ContinuousClock.now < deadline {
            if let states = try? await shardQueueStates(askingNode: 1) {
                last = states.map { "\($0.name): \($0.online)/\($0.members) online" }.joined(separator: ", ")
                if states.count == shardQueues.count, states.allSatisfy({ $0.members == 3 && $0.online == 3 }) { return }
            }
            try await Task.sleep(for: .seconds(1))
        }
        throw ChaosError(message: "the shard queues did not get all three members back within 90 s: \(last)")
    }

    /// Stops the Redis primary; once the sentinels have promoted the replica, starts the old
    /// primary again (as the new one's replica).
    func redisFailover() async throws {
        let primary = try await currentRedisPrimary()
        run.progress("chaos: stopping the Redis primary (instance \(primary))")
        try await services(["redis-stop", "\(primary)"])
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if let now = try? await currentRedisPrimary(), now != primary { break }
            try await Task.sleep(for: .milliseconds(500))
        }
        guard let now = try? await currentRedisPrimary(), now != primary else {
            throw ChaosError(message: "the sentinels did not promote the replica within 60 s")
        }
        try await services(["redis-start", "\(primary)"])
    }

    private func currentRedisPrimary() async throws -> Int {
        let out = try await run.command(run.settings.repository + "/ops/services", ["redis-primary", servicesDirectory], log: "services.log")
        guard let n = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw ChaosError(message: "redis-primary printed \(out)") }
        return n
    }

    /// `SHUTDOWN SAVE`, then the same data again (a restart with persistence).
    func restartRedis() async throws {
        let redis = state.withLock { $0.redisURL }
        guard let port = redis.split(separator: ":").last?.split(separator: "/").first.map(String.init) else {
            throw ChaosError(message: "no Redis port in \(redis)")
        }
        _ = try? await run.command("/usr/bin/redis-cli", ["-p", port, "shutdown", "save"], log: "services.log")
        try await Task.sleep(for: .seconds(2))
        try await services(["redis-start"])
    }

    func killAndReplaceWorker(_ index: Int) async throws {
        guard let (child, port) = state.withLock({ s in s.workers.indices.contains(index) ? s.workers[index] : nil }) else { return }
        await scrape(child, port: port)
        child.signal(SIGKILL)
        _ = await child.exited(within: .seconds(10))
        let replacement = try await startWorker(port: port)
        state.withLock { $0.workers[index] = (replacement, port) }
        try await waitReady(replacement, "http://127.0.0.1:\(port)/readyz")
    }

    func pauseWorker(_ index: Int, for pause: Duration) async throws {
        guard let (child, port) = state.withLock({ s in s.workers.indices.contains(index) ? s.workers[index] : nil }) else { return }
        await scrape(child, port: port)
        child.signal(SIGSTOP)
        try await Task.sleep(for: pause)
        child.signal(SIGCONT)
    }

    func pauseIngress(_ index: Int, for pause: Duration) async throws {
        guard let ingress = state.withLock({ s in s.ingresses.indices.contains(index) ? s.ingresses[index] : nil }) else { return }
        ingress.signal(SIGSTOP)
        try await Task.sleep(for: pause)
        ingress.signal(SIGCONT)
    }

    /// Two extra workers join, then leave one after the other (SIGTERM: a graceful hand-over).
    func handoverStorm() async throws {
        let spare = state.withLock { $0.spare }
        var extra: [(ChildProcess, Int)] = []
        for port in spare.prefix(2) {
            let child = try await startWorker(port: port)
            extra.append((child, port))
        }
        for (child, port) in extra { try await waitReady(child, "http://127.0.0.1:\(port)/readyz") }
        try await Task.sleep(for: .seconds(3))
        for (child, port) in extra {
            await scrape(child, port: port)
            _ = await child.stop(grace: .seconds(30))
            try await Task.sleep(for: .seconds(2))
        }
    }

    // MARK: - Reading the outcome

    /// Reads a worker's `uncertain` count (kept per process, its highest value).
    func scrape(_ child: ChildProcess, port: Int) async {
        guard child.termination == nil,
            let r = try? await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port)/metrics"), timeout: .seconds(2)),
            let body = try? await r.body.collect(upTo: 1 << 20)
        else { return }
        let prefix = #"wechat_worker_messages_total{outcome="uncertain"} "#
        let text = String(buffer: body)
        if let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }), let n = Double(line.dropFirst(prefix.count)) {
            run.noteUncertain(child.logPath, Int(n))
        }
    }

    func scrapeAll() async {
        for (child, port) in state.withLock({ $0.workers }) { await scrape(child, port: port) }
    }

    /// The message ids (dedup digests) in the dead-letter queue, read with `wechat-worker dead-letters list`.
    func deadLetterIDs() async throws -> Set<String> {
        let out = try await run.command(
            run.settings.binaries + "/wechat-worker", ["dead-letters", "list", "--limit", "100000"], environment: environment(["LOG_LEVEL": "error"]),
            log: "dead-letters.log")
        return Set(out.split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) })
    }
}
