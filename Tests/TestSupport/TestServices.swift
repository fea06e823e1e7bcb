import Synchronization
import Foundation
import Glibc

/// Where the brokers started by `ops/test` (through `ops/services`) listen.
///
/// Integration suites are enabled when the variable is set, and also under
/// `CI=true` without it — then they fail with a clear message rather than
/// skipping silently.
public enum TestServices {
    public static let environment = ProcessInfo.processInfo.environment
    public static var isCI: Bool { environment["CI"] == "true" }

    public static var amqpEnabled: Bool { environment["AMQP_URL"] != nil || isCI }

    public static func amqpURL() throws -> String {
        guard let url = environment["AMQP_URL"], !url.isEmpty else {
            throw MissingService(variable: "AMQP_URL")
        }
        return url
    }

    public static var redisEnabled: Bool { environment["REDIS_URL"] != nil || isCI }

    public static func redisURL() throws -> String {
        guard let url = environment["REDIS_URL"], !url.isEmpty else {
            throw MissingService(variable: "REDIS_URL")
        }
        return url
    }

    /// A unique name for this test's queues and exchanges.
    public static func unique(_ prefix: String) -> String {
        "test.\(prefix).\(UInt32.random(in: .min ... .max))"
    }
}

public struct MissingService: Error, CustomStringConvertible {
    public let variable: String
    public init(variable: String) { self.variable = variable }
    public var description: String {
        "\(variable) is not set: run the tests through ops/test, which starts RabbitMQ and Redis"
    }
}

/// A private RabbitMQ and Redis started with `ops/services start` for one test
/// that stops and restarts them, so that suites running in parallel are not disturbed.
public final class PrivateServices: Sendable {
    public let directory: String
    public let amqpURL: String
    public let redisURL: String
    /// With `opsRabbitMQ`: the management API and the Prometheus endpoint (no credentials; guest/guest).
    public let managementURL: String?
    public let prometheusURL: String?
    private let script: String

    /// - Parameter opsRabbitMQ: run RabbitMQ with ops/rabbitmq's configuration
    ///   and plugins (`ops/services start --ops-rabbitmq`).
    /// - Parameter cluster: three RabbitMQ nodes in one cluster (`--cluster`); ``amqpURL`` lists them.
    /// - Parameter sentinel: a Redis primary, two replicas and three sentinels (`--sentinel`);
    ///   ``redisURL`` is the `redis-sentinel://` form.
    public init(opsRabbitMQ: Bool = false, cluster: Bool = false, sentinel: Bool = false) async throws {
        guard let script = TestServices.environment["WR_SERVICES"] else {
            throw MissingService(variable: "WR_SERVICES")
        }
        self.script = script
        // Nested under the suite's own services directory, so that `ops/services stop`
        // of the whole run also stops these if a test dies before stopping them.
        var args = ["start"]
        if let parent = TestServices.environment["WR_SERVICES_DIR"] {
            args.append("\(parent)/private-\(UInt32.random(in: 0 ... .max))")
        }
        if opsRabbitMQ { args.append("--ops-rabbitmq") }
        if cluster { args.append("--cluster") }
        if sentinel { args.append("--sentinel") }
        let out = try await runCommand(script, args)
        var vars: [String: String] = [:]
        for line in out.split(separator: "\n") where line.hasPrefix("export ") {
            let kv = line.dropFirst("export ".count).split(separator: "=", maxSplits: 1)
            if kv.count == 2 { vars[String(kv[0])] = String(kv[1]) }
        }
        guard let dir = vars["WR_SERVICES_DIR"], let amqp = vars["AMQP_URL"], let redis = vars["REDIS_URL"] else {
            throw ServiceScriptError(message: "ops/services start printed no addresses: \(out)")
        }
        directory = dir
        amqpURL = amqp
        redisURL = redis
        managementURL = vars["RABBITMQ_MANAGEMENT_URL"]
        prometheusURL = vars["RABBITMQ_PROMETHEUS_URL"]
    }

    /// Stops RabbitMQ: node `node` (1…3) of a cluster, or every node.
    public func stopRabbitMQ(node: Int? = nil) async throws { try await runCommand(script, ["rabbitmq-stop", directory] + (node.map { ["\($0)"] } ?? [])) }
    /// Starts RabbitMQ again on the same ports and data: node `node`, or every node.
    public func startRabbitMQ(node: Int? = nil) async throws { try await runCommand(script, ["rabbitmq-start", directory] + (node.map { ["\($0)"] } ?? [])) }
    /// Stops Redis: instance `instance` (1 the first primary, 2 and 3 its replicas) under Sentinel, or all of it.
    public func stopRedis(instance: Int? = nil) async throws { try await runCommand(script, ["redis-stop", directory] + (instance.map { ["\($0)"] } ?? [])) }
    /// Starts Redis again (an instance under Sentinel starts as the current primary's replica).
    public func startRedis(instance: Int? = nil) async throws { try await runCommand(script, ["redis-start", directory] + (instance.map { ["\($0)"] } ?? [])) }
    /// Under Sentinel: the instance the sentinels call primary now.
    public func redisPrimary() async throws -> Int {
        let out = try await runCommand(script, ["redis-primary", directory])
        guard let n = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw ServiceScriptError(message: "redis-primary printed \(out)") }
        return n
    }
    /// The port of Redis instance `instance` (from the services' state file).
    public func redisPort(instance: Int) throws -> Int {
        try statePort(instance == 1 ? "REDIS_PORT" : "REDIS_PORT_\(instance)")
    }
    /// The AMQP port of RabbitMQ node `node` (1…3 in a cluster; 1 otherwise).
    public func amqpPort(node: Int) throws -> Int { try statePort("AMQP_PORT_\(node)") }
    private func statePort(_ variable: String) throws -> Int {
        let state = try String(contentsOfFile: directory + "/state", encoding: .utf8)
        let name = variable + "="
        guard let line = state.split(separator: "\n").first(where: { $0.hasPrefix(name) }), let port = Int(line.dropFirst(name.count)) else {
            throw ServiceScriptError(message: "no \(name) in \(directory)/state")
        }
        return port
    }
    public func stopAll() async { _ = try? await runCommand(script, ["stop", directory]) }
    /// Runs `rabbitmqctl` against this broker (for example to raise a memory alarm).
    @discardableResult
    public func rabbitmqctl(node: Int = 1, _ arguments: [String]) async throws -> String {
        try await runCommand(script, ["rabbitmqctl", directory, "--node", "\(node)"] + arguments)
    }

    /// Starts private services, runs `body`, and stops them whether `body` throws or not.
    public static func with<T>(
        opsRabbitMQ: Bool = false, cluster: Bool = false, sentinel: Bool = false, _ body: (PrivateServices) async throws -> T
    ) async throws -> T {
        let services = try await PrivateServices(opsRabbitMQ: opsRabbitMQ, cluster: cluster, sentinel: sentinel)
        do {
            let result = try await body(services)
            await services.stopAll()
            return result
        } catch {
            await services.stopAll()
            throw error
        }
    }
}

public struct ServiceScriptError: Error, CustomStringConvertible {
    public let message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// Runs a program to completion and returns its standard output (and, with
/// `includeStandardError`, its standard error in the same text).
///
/// The blocking `waitpid` runs on a thread of its own, never on Swift's
/// cooperative pool (Foundation's `Process.waitUntilExit` was seen to deadlock
/// when two tests waited at once).
@discardableResult
public func runCommand(_ executable: String, _ arguments: [String], includeStandardError: Bool = false) async throws -> String {
    let outPath = FileManager.default.temporaryDirectory
        .appendingPathComponent("wr-cmd-\(UInt64.random(in: 0 ... .max)).out").path
    defer { try? FileManager.default.removeItem(atPath: outPath) }
    let status: Int32 = try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            if includeStandardError { posix_spawn_file_actions_adddup2(&actions, 1, 2) }
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            let argv = ([executable] + arguments).map { strdup($0) } + [nil]
            defer { for a in argv { free(a) } }
            // The child starts as from a shell: no blocked signals, and SIGINT and
            // SIGTERM with their default actions (the test runner's thread may block
            // or ignore them, and a child inherits both).
            var attributes = posix_spawnattr_t()
            posix_spawnattr_init(&attributes)
            defer { posix_spawnattr_destroy(&attributes) }
            var none = sigset_t()
            sigemptyset(&none)
            posix_spawnattr_setsigmask(&attributes, &none)
            var defaults = sigset_t()
            sigemptyset(&defaults)
            sigaddset(&defaults, SIGINT)
            sigaddset(&defaults, SIGTERM)
            posix_spawnattr_setsigdefault(&attributes, &defaults)
            posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
            var pid: pid_t = 0
            let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
            guard rc == 0 else {
                continuation.resume(throwing: ServiceScriptError(message: "cannot run \(executable): errno \(rc)"))
                return
            }
            var wstatus: Int32 = 0
            while waitpid(pid, &wstatus, 0) < 0, errno == EINTR {}
            // WIFEXITED / WEXITSTATUS
            let exited = (wstatus & 0x7f) == 0
            continuation.resume(returning: exited ? (wstatus >> 8) & 0xff : 128 + (wstatus & 0x7f))
        }
        thread.start()
    }
    let out = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
    guard status == 0 else {
        throw ServiceScriptError(
            message: "\(executable) \(arguments.joined(separator: " ")) exited with \(status): \(out)")
    }
    return out
}

/// A value shared between test tasks, behind a lock (a class, so closures can capture it).
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    public var value: Value { mutex.withLock { $0 } }
}

/// A child process started by a test (not waited for), to be killed.
public struct ChildProcess: Sendable {
    public let pid: pid_t

    /// Starts `executable` with `environment` added to ours; output goes to `logPath`.
    public init(_ executable: String, arguments: [String] = [], environment: [String: String], logPath: String) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let env = ProcessInfo.processInfo.environment.merging(environment) { $1 }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in env + argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, nil, argv, env)
        guard rc == 0 else { throw ServiceScriptError(message: "cannot start \(executable): errno \(rc)") }
        self.pid = pid
    }

    /// Sends `signal` (SIGTERM, SIGSTOP, …).
    public func signal(_ signal: Int32) { _ = Glibc.kill(pid, signal) }

    /// Waits at most `seconds` for the process to exit; its exit status, or nil if it still runs
    /// (then it is killed). Polls `waitpid` every 50 ms: no event announces a child's exit here.
    public func waitForExit(within seconds: Int) async -> Int32? {
        let deadline = ContinuousClock.now + .seconds(seconds)
        var status: Int32 = 0
        while ContinuousClock.now < deadline {
            if waitpid(pid, &status, WNOHANG) == pid {
                return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        kill()
        return nil
    }

    /// SIGKILL, as a crash would, and reap it.
    public func kill() {
        _ = Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
    }
}

/// A port nothing listens on, for a service a test starts on it next.
///
/// Chosen below the kernel's ephemeral range (like `ops/services free-ports`): between
/// choosing it and the service binding it, outgoing connections of other tests cannot take
/// it as their local port (the fault tests open hundreds).
public func freePort() throws -> Int {
    let low = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8))
        .flatMap { $0.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first }
        .flatMap { Int($0) } ?? 32768
    for _ in 0..<1000 {
        let port = Int.random(in: 10000...max(10001, low - 1))
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let ok = withLoopbackAddress(port: port) { address, length in bind(fd, address, length.pointee) == 0 }
        close(fd)
        if ok { return port }
    }
    throw POSIXError(.EADDRINUSE)
}

public func canConnect(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    return withLoopbackAddress(port: port) { address, length in connect(fd, address, length.pointee) == 0 }
}

/// Runs `body` (`bind`, `connect`, `getsockname`, …) with the IPv4 loopback address of `port`
/// and its length; returns `body`'s answer and, in `port`, the address's port afterwards
/// (for `getsockname` after binding port 0).
public func withLoopbackAddress<T>(
    port: Int, _ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> T
) -> T {
    var bound = 0
    return withLoopbackAddress(port: port, boundPort: &bound, body)
}

public func withLoopbackAddress<T>(
    port: Int, boundPort: inout Int, _ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> T
) -> T {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let result = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, &length) }
    }
    boundPort = Int(UInt16(bigEndian: address.sin_port))
    return result
}

/// A Redis of a test's own: a plain `redis-server` on a free loopback port, no persistence,
/// started in milliseconds (unlike ``PrivateServices``, which also boots a RabbitMQ node).
public final class PrivateRedis: Sendable {
    public let port: Int
    /// A one-node Redis Cluster (every slot on this node): it refuses what a real cluster refuses
    /// (`CROSSSLOT`: a command's or a script's keys in more than one slot) without redirections.
    public let cluster: Bool
    public var url: String { "redis://127.0.0.1:\(port)/0" }
    private let process = Locked<ChildProcess?>(nil)

    public init(cluster: Bool = false) async throws {
        port = try freePort()
        self.cluster = cluster
        try await start()
    }

    /// Starts it (again) on the same port.
    public func start() async throws {
        let directory = FileManager.default.temporaryDirectory.path
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("redis-\(port).log").path
        let nodes = FileManager.default.temporaryDirectory.appendingPathComponent("redis-nodes-\(port).conf").path
        var arguments = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
        if cluster {
            try? FileManager.default.removeItem(atPath: nodes)
            arguments += ["--cluster-enabled", "yes", "--cluster-config-file", nodes]
        }
        let child = try ChildProcess("/usr/bin/redis-server", arguments: arguments, environment: [:], logPath: log)
        process.withLock { $0 = child }
        let deadline = ContinuousClock.now + .seconds(20)
        while !canConnect(port: port) {
            guard ContinuousClock.now < deadline else { throw ServiceScriptError(message: "redis-server did not start on \(port)") }
            try await Task.sleep(for: .milliseconds(20))
        }
        guard cluster else { return }
        _ = try await runCommand("/usr/bin/redis-cli", ["-p", String(port), "CLUSTER", "ADDSLOTSRANGE", "0", "16383"])
        try await eventually("the one-node cluster is up") {
            try await runCommand("/usr/bin/redis-cli", ["-p", String(self.port), "CLUSTER", "INFO"]).contains("cluster_state:ok")
        }
    }

    /// Stops it at once (SIGKILL), as a crash would.
    public func stop() {
        process.withLock { $0 }?.kill()
        process.withLock { $0 = nil }
    }

    deinit { process.withLock { $0 }?.kill() }
}

/// Waits for `condition` with a bound; for states no event announces, it polls every 50 ms
/// (never an assertion on time). Throws ``TimedOut`` (failing the test) when the bound runs out.
public func eventually(_ what: String, within seconds: Int = 30, _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw TimedOut(what: what, seconds: seconds)
}

/// A bounded wait of ``eventually(_:within:_:)`` ran out.
public struct TimedOut: Error, CustomStringConvertible {
    public let what: String
    public let seconds: Int
    public init(what: String, seconds: Int) {
        self.what = what
        self.seconds = seconds
    }
    public var description: String { "timed out after \(seconds) s waiting for: \(what)" }
}
