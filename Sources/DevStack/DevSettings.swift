import Foundation

/// What `ops/dev` runs, from its environment (docs/CONTRACT.md, "The local stack").
public struct DevSettings: Sendable {
    /// The repository (for `ops/services` and `ops/nginx/local-conf`): `DEV_REPO`, else the
    /// working directory (`ops/dev` runs from the repository's root).
    public var repository: String
    /// The public port (nginx): `DEV_PORT`, default 8080; 0 picks a free one.
    public var port: Int
    /// The run's folder (logs, nginx configuration, brokers' data): `DEV_DIR`, default
    /// `<repository>/.build-dev/<time>`.
    public var directory: String
    /// Where `wechat-ingress`, `wechat-worker`, `wechat-tokend` and `wechat-sim` are:
    /// `DEV_BIN_DIR`, default the folder of this executable.
    public var binaries: String
    /// RabbitMQ and Redis to reuse (both `AMQP_URL` and `REDIS_URL` set); otherwise the stack
    /// starts its own and stops them at the end.
    public var reuse: (amqpURL: String, redisURL: String)?
    /// `DEV_CLUSTER=1` (`ops/dev --cluster`): the brokers in their production shape, three
    /// RabbitMQ nodes in a cluster and Redis with two replicas under three sentinels.
    public var cluster: Bool
    /// `DEV_DECIDE=1` (`ops/dev --decide`): the workers ask the simulator's toy decision
    /// service (`WORKER_DECIDE_URL`, `/sim/decide`) for every reply instead of the built-in rules.
    public var decide: Bool
    /// `DEV_PASSIVE=1` (`ops/dev --passive`): passive-first replies — the ingresses wait up to
    /// 4 s (`INGRESS_REPLY_WAIT`) and the workers offer each reply to them first
    /// (`WORKER_REPLY_MODE=passive-first`), so the demo reply comes in the HTTP response.
    public var passive: Bool
    /// `LOG_LEVEL` for every process, default `info`.
    public var logLevel: String
    /// The environment the children inherit (the stack's own variables override it).
    public var environment: [String: String]

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init(environment: [String: String], ownDirectory: String, now: Date = Date()) throws {
        self.environment = environment
        repository = environment["DEV_REPO"] ?? FileManager.default.currentDirectoryPath
        guard FileManager.default.isExecutableFile(atPath: repository + "/ops/services") else {
            throw Invalid(description: "\(repository) is not the repository (no ops/services); run ops/dev, or set DEV_REPO")
        }
        let portText = environment["DEV_PORT"] ?? "8080"
        guard let port = Int(portText), (0...65_535).contains(port) else {
            throw Invalid(description: "DEV_PORT must be a port number (0 picks a free one), not '\(portText)'")
        }
        self.port = port
        if let dir = environment["DEV_DIR"], !dir.isEmpty {
            directory = dir.hasPrefix("/") ? dir : repository + "/" + dir
        } else {
            var calendar = Calendar(identifier: .gregorian)
            calendar.timeZone = .current
            let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second], from: now)
            let name = String(format: "%04d%02d%02d-%02d%02d%02d", c.year ?? 0, c.month ?? 0, c.day ?? 0, c.hour ?? 0, c.minute ?? 0, c.second ?? 0)
            directory = repository + "/.build-dev/" + name
        }
        binaries = environment["DEV_BIN_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? ownDirectory
        for exe in ["wechat-ingress", "wechat-worker", "wechat-tokend", "wechat-sim"] {
            guard FileManager.default.isExecutableFile(atPath: binaries + "/" + exe) else {
                throw Invalid(description: "\(binaries)/\(exe) is missing (build first, or set DEV_BIN_DIR)")
            }
        }
        if let amqp = environment["AMQP_URL"], !amqp.isEmpty, let redis = environment["REDIS_URL"], !redis.isEmpty {
            reuse = (amqp, redis)
        } else {
            reuse = nil
        }
        logLevel = environment["LOG_LEVEL"].flatMap { $0.isEmpty ? nil : $0 } ?? "info"
        func flag(_ name: String) throws -> Bool {
            switch environment[name] ?? "" {
            case "", "0", "false": return false
            case "1", "true": return true
            case let other: throw Invalid(description: "\(name) must be 1 or 0, not '\(other)'")
            }
        }
        cluster = try flag("DEV_CLUSTER")
        decide = try flag("DEV_DECIDE")
        passive = try flag("DEV_PASSIVE")
        if cluster, reuse != nil { throw Invalid(description: "DEV_CLUSTER starts brokers of its own: unset AMQP_URL and REDIS_URL, or DEV_CLUSTER") }
    }
}
