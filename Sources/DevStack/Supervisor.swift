import AsyncHTTPClient
import Foundation
import Synchronization

/// Starts the stack, watches it, and stops exactly what it started, in reverse order.
final class Supervisor: Sendable {
    let settings: DevSettings
    let logs: String
    /// Where our own brokers live (`nil` when reusing running ones).
    let servicesDirectory: String?
    private let children = Mutex<[ChildProcess]>([])
    /// Runs what must outlive the start-up (the children, the brokers' start script): a task
    /// of the top-level task group (``DevStack``), which a stop does not cancel.
    let host = ProcessHost()

    /// The demo account. The simulator plays WeChat, so these are not real secrets.
    static let account = [
        "WECHAT_APPID": "wxd0e1f2a3b4c5d6e7",
        "WECHAT_TOKEN": "devtoken",
        "WECHAT_AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        "WECHAT_SECRET": "dev-app-secret",
    ]

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    init(settings: DevSettings) {
        self.settings = settings
        logs = settings.directory + "/logs"
        servicesDirectory = settings.reuse == nil ? settings.directory + "/services" : nil
    }

    // MARK: - Start-up

    /// Starts everything, shows the demo and the addresses, then waits until a child exits
    /// (a failure) or the task is cancelled (a stop was asked for).
    func startAndRun() async throws {
        let s = settings
        try FileManager.default.createDirectory(atPath: logs, withIntermediateDirectories: true)
        Console.say("logs go to \(logs)")
        let (amqpURL, redisURL) = try await brokers()
        let ports = try await freePorts(7)
        let publicPort = s.port == 0 ? ports[6] : s.port
        if s.port != 0, !portIsFree(s.port) {
            throw Failure(description: "port \(s.port) is in use; set DEV_PORT to another port (0 picks a free one)")
        }
        let simURL = "http://127.0.0.1:\(ports[0])"
        let tokendURL = "http://127.0.0.1:\(ports[1])"
        let publicURL = "http://127.0.0.1:\(publicPort)/wechat"
        let tokendSecret = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0 ... .max)) }.joined()
        var base = s.environment.merging(Self.account) { $1 }
        base["TOKEND_SECRET"] = tokendSecret
        base["LOG_LEVEL"] = s.logLevel
        base["AMQP_URL"] = amqpURL
        base["REDIS_URL"] = redisURL
        let bin = s.binaries

        let sim = try await start("sim", bin + "/wechat-sim", ["api"], base, ["HTTP_HOST": "127.0.0.1", "HTTP_PORT": "\(ports[0])"])
        try await waitReady(sim, simURL + "/healthz")
        let tokend = try await start("tokend", bin + "/wechat-tokend", [], base, ["HTTP_HOST": "127.0.0.1", "HTTP_PORT": "\(ports[1])", "WECHAT_API_URL": simURL])
        try await waitReady(tokend, tokendURL + "/readyz")
        var ready: [(ChildProcess, String)] = []
        for n in 1...2 {
            let port = ports[1 + n]
            var env = ["HTTP_HOST": "127.0.0.1", "HTTP_PORT": "\(port)"]
            // The workers' reply mode too: one exported in the shell must not reach the ingress alone.
            if s.passive { env["INGRESS_REPLY_WAIT"] = "4"; env["WORKER_REPLY_MODE"] = "passive-first" }
            ready.append((try await start("ingress-\(n)", bin + "/wechat-ingress", [], base, env), "http://127.0.0.1:\(port)/readyz"))
        }
        for n in 1...2 {
            let port = ports[3 + n]
            var env = ["METRICS_PORT": "\(port)", "WECHAT_API_URL": simURL, "TOKEND_URL": tokendURL]
            if s.decide { env["WORKER_DECIDE_URL"] = simURL + "/sim/decide" }
            if s.passive { env["WORKER_REPLY_MODE"] = "passive-first" }
            ready.append((try await start("worker-\(n)", bin + "/wechat-worker", [], base, env), "http://127.0.0.1:\(port)/readyz"))
        }
        for (child, url) in ready { try await waitReady(child, url) }

        // nginx in the foreground with ops/nginx/wechat-locations.conf: the same locations,
        // limits and timeouts as production.
        let nginxDir = s.directory + "/nginx"
        _ = try await command(s.repository + "/ops/nginx/local-conf", [nginxDir, logs, "\(publicPort)", "1", "\(ports[2])", "\(ports[3])"], log: "nginx.log")
        let nginx = try await start("nginx", "/usr/sbin/nginx", ["-e", logs + "/nginx.log", "-c", nginxDir + "/nginx.conf"], base, [:])
        try await waitReady(nginx, "http://127.0.0.1:\(publicPort)/nginx-healthz")

        Console.say("demo: a user sends 帮助 (safe mode) through nginx")
        let sim_ = [bin + "/wechat-sim", "send", "--url", publicURL, "--api", simURL]
        let reply: String
        do {
            reply = try await command(sim_[0], Array(sim_.dropFirst()) + ["text", "帮助", "--mode", "safe", "--wait-reply"], environment: base, log: "demo.log")
        } catch let failed as Command.Failed {
            throw Failure(description: "the demo message got no reply (\(failed.termination); \(logs)/demo.log):\n\(tailOfFile(logs + "/demo.log"))")
        }

        // The tokend secret goes to a private file, never to the terminal or a log.
        let secretFile = s.directory + "/tokend-secret"
        _ = FileManager.default.createFile(atPath: secretFile, contents: Data((tokendSecret + "\n").utf8), attributes: [.posixPermissions: 0o600])
        let demo = reply.split(separator: "\n").map { "  demo │ \($0)" }.joined(separator: "\n")
        let account = Self.account
        Console.show(
            """

            WeChatRelay is running.
            \(demo)
              WeChat endpoint  \(publicURL)   (nginx → ingress :\(ports[2]), :\(ports[3]))
              fake WeChat API  \(simURL)   (GET /sim/messages lists the replies sent)
              tokend           \(tokendURL)   (Authorization: Bearer $(cat \(secretFile)))
              workers          metrics on :\(ports[4]) and :\(ports[5])  (/metrics, /readyz)
              RabbitMQ         \(redacted(amqpURL))
              Redis            \(redacted(redisURL))
              logs             \(logs)

            Send more (in another shell):
              export WECHAT_APPID=\(account["WECHAT_APPID"] ?? "") WECHAT_TOKEN=\(account["WECHAT_TOKEN"] ?? "") WECHAT_AES_KEY=\(account["WECHAT_AES_KEY"] ?? "")
              \(sim_.joined(separator: " ")) text 菜单 --wait-reply
              \(sim_.joined(separator: " ")) event subscribe --mode safe --wait-reply
              curl -s \(simURL)/sim/messages      # every reply the workers sent


            """)
        Console.say("ready; Ctrl-C stops everything ops/dev started")

        guard let (child, termination) = await firstExit() else { throw CancellationError() }
        throw Failure(description: "\(child.name) exited unexpectedly (\(termination)); log: \(child.logPath)\n\(child.logTail())")
    }

    /// Our own RabbitMQ and Redis (through `ops/services`), or the ones to reuse.
    private func brokers() async throws -> (String, String) {
        guard let dir = servicesDirectory else {
            Console.say("reusing the RabbitMQ and Redis of AMQP_URL and REDIS_URL")
            return settings.reuse.map { ($0.amqpURL, $0.redisURL) } ?? ("", "")
        }
        // Not cut short by a stop: the script must finish writing the state and pid files
        // that `ops/services stop` reads, or a broker could be left running.
        let repository = settings.repository
        let shape = settings.cluster ? ["--cluster", "--sentinel"] : []
        if settings.cluster { Console.say("starting three RabbitMQ nodes in a cluster and Redis with two replicas under three sentinels") }
        let out = try await host.shielded { try await self.command(repository + "/ops/services", ["start", dir] + shape, log: "services.log") }
        try Task.checkCancellation()
        guard let urls = brokerURLs(fromServicesOutput: out) else {
            throw Failure(description: "ops/services start printed no AMQP_URL and REDIS_URL (see \(logs)/services.log)")
        }
        return urls
    }

    private func freePorts(_ n: Int) async throws -> [Int] {
        let out = try await command(settings.repository + "/ops/services", ["free-ports", "\(n)"], log: "services.log")
        let ports = out.split(separator: "\n").compactMap { Int($0) }
        guard ports.count == n else { throw Failure(description: "ops/services free-ports gave \(ports.count) ports, not \(n)") }
        return ports
    }

    /// Starts a child (its log is `<logs>/<name>.log`) and remembers it for the stop.
    private func start(_ name: String, _ executable: String, _ arguments: [String], _ base: [String: String], _ extra: [String: String]) async throws -> ChildProcess {
        try Task.checkCancellation()
        let child = ChildProcess(
            name: name, executable: executable, arguments: arguments, environment: base.merging(extra) { $1 },
            directory: settings.directory, logPath: "\(logs)/\(name).log")
        children.withLock { $0.append(child) }
        guard let pid = await host.start(child) else {
            throw Failure(description: "could not start \(name) (\(executable)): \(child.termination ?? .notStarted("unknown"))")
        }
        Console.say("started \(name) (pid \(pid))")
        return child
    }

    /// Polls `url` until it answers 200 (60 s), failing at once if the child exits meanwhile.
    private func waitReady(_ child: ChildProcess, _ url: String) async throws {
        let deadline = ContinuousClock.now + .seconds(60)
        while true {
            if let t = child.termination {
                throw Failure(description: "\(child.name) exited during start-up (\(t)); log: \(child.logPath)\n\(child.logTail())")
            }
            if await answersOK(url) { return }
            guard ContinuousClock.now < deadline else {
                throw Failure(description: "\(child.name) is not ready at \(url) after 60 s; log: \(child.logPath)\n\(child.logTail())")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    private func answersOK(_ url: String) async -> Bool {
        do {
            let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: url), timeout: .seconds(1))
            _ = try? await response.body.collect(upTo: 1 << 16)
            return response.status == .ok
        } catch {
            return false
        }
    }

    private func command(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, log: String) async throws -> String {
        try await Command(
            executable: executable, arguments: arguments, environment: environment ?? settings.environment,
            directory: settings.repository, errorLog: "\(logs)/\(log)"
        ).run()
    }

    /// The first child to exit, or `nil` when the calling task is cancelled first.
    private func firstExit() async -> (ChildProcess, Termination)? {
        let all = children.withLock { $0 }
        return await withTaskGroup(of: (ChildProcess, Termination)?.self) { group in
            for child in all { group.addTask { await child.exited().map { (child, $0) } } }
            defer { group.cancelAll() }
            return await group.next() ?? nil
        }
    }

    // MARK: - Stop

    /// Stops every child, the last started first, each with SIGTERM (SIGKILL after 20 s),
    /// reports how each ended, then stops our own brokers. Touches nothing it did not start.
    func shutdown() async {
        let all = children.withLock { $0 }
        if !all.isEmpty {
            Console.say("stopping \(all.reversed().map(\.name).joined(separator: " "))")
            var exits: [String] = []
            for child in all.reversed() {
                let (termination, killed) = await child.stop(grace: .seconds(20))
                if killed { Console.say("\(child.name) did not stop within 20 s; killed it") }
                exits.append("\(child.name)=\(termination)")
            }
            Console.say("exit statuses: \(exits.joined(separator: " "))")
        }
        if let dir = servicesDirectory, FileManager.default.fileExists(atPath: dir + "/state") {
            Console.say("stopping RabbitMQ and Redis")
            do {
                _ = try await command(settings.repository + "/ops/services", ["stop", dir], log: "services.log")
            } catch {
                Console.say("could not stop the brokers in \(dir): \(error)")
            }
        }
        if FileManager.default.fileExists(atPath: logs) { Console.say("stopped; logs are in \(logs)") }
    }

    /// A URL without its password.
    /// The URL (or each of a list) without its user and password. A list is split where the
    /// AMQP parser splits it (a comma before another `scheme://`), so a comma in a password
    /// stays inside its URL; the user information ends at the URL's last `@`.
    private func redacted(_ urls: String) -> String {
        var parts: [String] = []
        for piece in urls.split(separator: ",", omittingEmptySubsequences: false) {
            if parts.isEmpty || piece.contains("://") { parts.append(String(piece)) } else { parts[parts.count - 1] += "," + piece }
        }
        return parts.map { url in
            guard let scheme = url.range(of: "://"), let at = url[scheme.upperBound...].lastIndex(of: "@") else { return url }
            return String(url[..<scheme.upperBound]) + String(url[url.index(after: at)...])
        }.joined(separator: ",")
    }
}
