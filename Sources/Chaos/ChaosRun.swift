import AsyncHTTPClient
import DevStack
import Foundation
import Hummingbird
import Logging
import ServiceLifecycle
import Simulator
import Synchronization
import WeChat

/// The faults a chaos run injects, each in a slot of its own.
public enum ChaosFault: String, CaseIterable, Sendable, Codable {
    /// SIGKILL a worker (after its metrics are read) and start a new one.
    case killWorker = "kill-worker"
    /// SIGSTOP a worker past the broker's heartbeat and its membership, then SIGCONT.
    case pauseWorker = "pause-worker"
    case restartRabbitMQ = "restart-rabbitmq"
    /// A graceful Redis restart (`SHUTDOWN SAVE`, start on the same data), as with persistence.
    case restartRedis = "restart-redis"
    /// RabbitMQ's memory alarm for a few seconds (publishing blocked).
    case memoryAlarm = "memory-alarm"
    /// 30% of API calls answered -1.
    case apiErrors = "api-errors"
    /// Every call with a token answered 42001 for a moment (tokens refreshed through tokend).
    case tokenRejections = "token-rejections"
    /// 10% of API calls never answered (the workers' sends time out: uncertain).
    case apiTimeouts = "api-timeouts"
    /// Every API call 1.5 s slow.
    case slowAPI = "slow-api"
    /// Two extra workers join and leave (shards handed over back and forth).
    case handoverStorm = "handover-storm"
    /// An ingress replica stops answering for 7 s (SIGSTOP): WeChat's pushes to it time out and
    /// are retried, and every try is published once it resumes (the workers drop the copies).
    case slowIngress = "slow-ingress"
    /// Cluster only: the RabbitMQ node leading most shard queues stops for 10 s, then starts
    /// again; the fault ends when every shard queue has all its members back in sync.
    case stopLeaderNode = "stop-leader-node"
    /// Cluster only: the RabbitMQ node the ingress replicas are connected to stops for 10 s
    /// (they reconnect to another node), then starts and rejoins.
    case stopIngressNode = "stop-ingress-node"
    /// Sentinel only: the Redis primary is stopped; the sentinels promote the replica; the old
    /// primary comes back as the new one's replica.
    case redisFailover = "redis-failover"

    /// Whether the fault applies to a stack of this shape.
    public func applies(cluster: Bool, sentinel: Bool) -> Bool {
        switch self {
        case .stopLeaderNode, .stopIngressNode: return cluster
        case .redisFailover: return sentinel
        // A graceful restart of the one Redis; under Sentinel the failover takes its place.
        case .restartRedis: return !sentinel
        default: return true
        }
    }
}

/// What a chaos run does.
public struct ChaosSettings: Sendable {
    public var seed: UInt64
    /// Seconds of pushing; the faults are spread over it.
    public var duration: Int
    public var users: Int
    /// Pushes per second.
    public var rate: Double
    public var workers: Int
    public var ingresses: Int
    /// How often each fault comes (in a seeded order).
    public var rounds: Int
    public var repository: String
    public var binaries: String
    /// The run's folder: logs, rules, the brokers' data.
    public var directory: String
    /// Three RabbitMQ nodes in a cluster (`ops/services --cluster`).
    public var cluster = false
    /// Redis with two replicas under three sentinels (`ops/services --sentinel`).
    public var sentinel = false
    /// Only these faults (each still once per round, in a seeded order); nil = every fault
    /// that applies to the stack's shape.
    public var faults: [ChaosFault]?
    /// Passive replies: the ingresses wait 1 s for them (`INGRESS_REPLY_WAIT`) and the workers
    /// run `WORKER_REPLY_MODE=passive-first`; a reply in the HTTP response counts like one
    /// through the API (each must go out exactly one way).
    public var passive = false

    /// The faults of a round.
    public var schedule: [ChaosFault] {
        (faults ?? ChaosFault.allCases).filter { $0.applies(cluster: cluster, sentinel: sentinel) }
    }

    public init(
        seed: UInt64, duration: Int, users: Int = 40, rate: Double = 20, workers: Int = 3, ingresses: Int = 2, rounds: Int = 1,
        repository: String, binaries: String, directory: String
    ) {
        self.seed = seed
        self.duration = duration
        self.users = users
        self.rate = rate
        self.workers = workers
        self.ingresses = ingresses
        self.rounds = rounds
        self.repository = repository
        self.binaries = binaries
        self.directory = directory
    }
}

/// The outcome of a chaos run: per fault (the pushes made while it was on) and in total.
public struct ChaosReport: Sendable, Codable {
    public struct Row: Sendable, Codable {
        public var phase: String
        public var pushes = 0, accepted = 0, refused = 0, unknown = 0, replies = 0
        public var lost = 0, duplicated = 0, reordered = 0, answeredRefused = 0, sessionWrong = 0
        /// Worst time from a push to its (first) reply, ms.
        public var worstLatencyMs: Int64 = 0
    }

    public var seed: UInt64
    public var rows: [Row]
    public var total: Row
    /// Counted by the workers (`wechat_worker_messages_total{outcome="uncertain"}`).
    public var uncertain: Int
    /// Pushes found in the dead-letter queue at the end.
    public var deadLettered: Int
    /// Of the replies, those that came in the HTTP response (passive replies).
    public var passiveReplies = 0
    /// Faults that could not be applied, with the reason.
    public var faultErrors: [String]
    /// A few of the users whose replies broke an invariant, with what they got (for a diagnosis).
    public var examples: [String] = []

    /// The invariants: nothing lost or reordered, duplicates only where a send was uncertain,
    /// no reply to a refused push, session counters in step.
    public var holds: Bool {
        total.lost == 0 && total.reordered == 0 && total.duplicated <= uncertain && total.answeredRefused == 0 && total.sessionWrong == 0
    }

    public var table: String {
        func cells(_ values: [String]) -> String {
            values.enumerated().map { i, v in
                i == 0 ? v.padding(toLength: 24, withPad: " ", startingAt: 0) : String(repeating: " ", count: max(0, 8 - v.count)) + v
            }.joined(separator: " ")
        }
        func line(_ r: Row) -> String {
            cells([r.phase] + [r.pushes, r.accepted, r.refused, r.unknown, r.replies, r.lost, r.duplicated, r.reordered, r.answeredRefused, r.sessionWrong].map(String.init)
                + [String(r.worstLatencyMs)])
        }
        let header = cells(["phase", "pushes", "accepted", "refused", "unknown", "replies", "lost", "dup", "reorder", "ans-ref", "session", "worst ms"])
        var out = [header] + rows.map(line) + [line(total)]
        out.append("uncertain sends (workers' count): \(uncertain); dead-lettered (skipped, with reason): \(deadLettered); seed \(seed)")
        if passiveReplies > 0 { out.append("replies in the HTTP response (passive): \(passiveReplies) of \(total.replies)") }
        if !faultErrors.isEmpty { out.append("faults that failed: \(faultErrors.joined(separator: "; "))") }
        for e in examples { out.append("  " + e) }
        out.append(holds ? "invariants hold" : "INVARIANTS BROKEN")
        return out.joined(separator: "\n")
    }
}

/// A chaos run of the whole real stack (`wechat-sim chaos`): RabbitMQ and Redis (throwaway,
/// through `ops/services`), tokend, ingress replicas and workers as processes, the fake
/// WeChat API in this process; a steady push load from many users (WeChat's retries
/// included: 5 s timeout, 3 tries); faults on a seeded schedule; then a check, per user, from
/// the fake API's log. Each reply echoes its push (`c:<user>:<seq> n=<messages counted>`),
/// so order, duplicates and session counters can be read off the replies.
public final class ChaosRun: Sendable {
    let settings: ChaosSettings
    let progress: @Sendable (String) -> Void
    let host = ProcessHost()
    let platform: FakePlatform
    let appID = "wxc1a05c1a05c1a05"
    let token = "chaostoken"
    let secret = "chaos-secret"
    let prefix: String
    private let state = Mutex(State())

    struct Push: Sendable {
        var user: String
        var seq: Int
        var dedupID: String
        var phase: String
        var pushedAtMs: Int64
        var outcome: Outcome
        enum Outcome: Sendable { case accepted, refused, unknown }
    }

    struct Worker: Sendable {
        var child: ChildProcess
        var port: Int
    }

    private struct State {
        var pushes: [Push] = []
        /// Replies that came in a push's HTTP response: (`c:` content, when).
        var passive: [(content: String, at: Int64)] = []
        var phase = "quiet"
        var workers: [Worker] = []
        /// Highest `uncertain` count seen per worker process (by log path).
        var uncertain: [String: Int] = [:]
        var faultErrors: [String] = []
        var nextWorker = 0
    }

    public init(settings: ChaosSettings, progress: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.progress = progress
        // WeChat's quota of 5 replies per user message is not what this run checks (the
        // fake API counts it from the push, while replies may lag behind a fault): no quota.
        var platformSettings = FakePlatform.Settings(appID: appID, secret: secret)
        platformSettings.messageQuota = 1_000_000
        platform = FakePlatform(settings: platformSettings)
        prefix = "chaos\(settings.seed)"
    }

    /// Runs everything and returns the report (throws if the stack cannot be started).
    public func run() async throws -> ChaosReport {
        try FileManager.default.createDirectory(atPath: settings.directory + "/logs", withIntermediateDirectories: true)
        var logger = Logger(label: "wechat-sim-chaos")
        logger.logLevel = .warning
        let ports = try await freePorts(2 + settings.ingresses + settings.workers + 4)
        let api = Application(
            router: FakeAPI(platform: platform, logger: logger).router(),
            configuration: .init(address: .hostname("127.0.0.1", port: ports[0])), logger: logger)
        let apiGroup = ServiceGroup(configuration: .init(services: [.init(service: api)], logger: logger))
        return try await withThrowingTaskGroup(of: ChaosReport?.self) { group in
            group.addTask {
                try await apiGroup.run()
                return nil
            }
            group.addTask {
                await self.host.run()
                return nil
            }
            group.addTask {
                defer { self.host.finish() }
                let stack = Stack(run: self, apiPort: ports[0], ports: Array(ports.dropFirst()))
                do {
                    try await stack.start()
                    let report = try await self.exercise(stack)
                    await stack.stop()
                    await apiGroup.triggerGracefulShutdown()
                    return report
                } catch {
                    await stack.stop()
                    await apiGroup.triggerGracefulShutdown()
                    throw error
                }
            }
            var report: ChaosReport?
            for try await r in group { if let r { report = r } }
            guard let report else { throw ChaosError(message: "no report") }
            return report
        }
    }

    // MARK: - Load and faults

    private func exercise(_ stack: Stack) async throws -> ChaosReport {
        var rng = SplitMix64(seed: settings.seed)
        var schedule: [ChaosFault] = []
        for _ in 0..<max(1, settings.rounds) { schedule += settings.schedule.shuffled(using: &rng) }
        let slot = Double(settings.duration) / Double(schedule.count + 1)
        progress("chaos: \(schedule.count) faults, one every \(String(format: "%.1f", slot)) s, after \(String(format: "%.1f", slot)) s of quiet")
        let pushers = stack.ingressURLs.map { url in Pusher(ingressURL: url, appID: appID, token: token, aesKey: nil, mode: .plaintext) }
        let stopLoad = Flag()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.load(pushers, until: stopLoad) }
            try await Task.sleep(for: .seconds(slot))
            for fault in schedule {
                let started = ContinuousClock.now
                state.withLock { $0.phase = fault.rawValue }
                progress("chaos: \(fault.rawValue)")
                do {
                    try await apply(fault, stack, &rng)
                } catch {
                    state.withLock { $0.faultErrors.append("\(fault.rawValue): \(error)") }
                    progress("chaos: \(fault.rawValue) failed: \(error)")
                }
                let rest = Duration.seconds(slot) - (ContinuousClock.now - started)
                state.withLock { $0.phase = "after-\(fault.rawValue)" }
                if rest > .zero { try await Task.sleep(for: rest) }
            }
            stopLoad.set()
            try await group.waitForAll()
        }
        progress("chaos: load stopped; waiting for the last replies")
        try await drain(stack)
        return try await check(stack, schedule: schedule)
    }

    /// Each user pushes its next message once the previous one got its final answer (WeChat's
    /// retries included), about every `users / rate` seconds, so that the ingress receives a
    /// user's accepted messages in their sequence order; all users together push at `rate`.
    private func load(_ pushers: [Pusher], until stop: Flag) async {
        let period = Double(settings.users) / settings.rate
        let msgBase = UInt64(settings.seed % 1000 + 1) << 40
        await withDiscardingTaskGroup { group in
            for u in 0..<settings.users {
                group.addTask {
                    let user = String(format: "oChaos%04d", u)
                    // Users start spread over one period.
                    try? await Task.sleep(for: .seconds(period * Double(u) / Double(self.settings.users)))
                    var seq = 0
                    while !stop.isSet {
                        let started = ContinuousClock.now
                        seq += 1
                        let msgID = msgBase + UInt64(u) << 20 + UInt64(seq)
                        let phase = self.state.withLock { $0.phase }
                        await self.pushOne(pushers[(u + seq) % pushers.count], user: user, seq: seq, msgID: msgID, phase: phase)
                        let next = started + .seconds(period)
                        if next > ContinuousClock.now { try? await Task.sleep(until: next, clock: .continuous) }
                    }
                }
            }
        }
    }

    private func pushOne(_ pusher: Pusher, user: String, seq: Int, msgID: UInt64, phase: String) async {
        let pushedAt = Int64(Date().timeIntervalSince1970 * 1000)
        guard let xml = try? PushBuilder.xml(kind: "text", value: "c:\(user):\(seq)", eventKey: nil, from: user, to: pusher.accountID, msgID: msgID),
            let message = try? InboundMessage(xml: xml)
        else { return }
        platform.userPushed(openID: user, msgType: "text", event: nil)
        // 200 `success`: accepted. A 4xx: refused (never published). A 5xx after the last try,
        // or no answer: unknown (the ingress answers 503 when a publish's fate is unknown).
        var outcome = Push.Outcome.unknown
        var passive: String?
        if let result = try? await pusher.push(xml, openID: user) {
            // A passive reply (read as WeChat reads it) is an answer of its own.
            let reply = result.status == 200 ? (try? pusher.passiveReply(in: result.body)) : nil
            if result.status == 200 {
                // Accepted. An answer WeChat could not read (a bad signature, an undecryptable
                // reply) counts as no reply at all: it shows up as lost, never as refused.
                outcome = .accepted
                if let reply { passive = reply[child: "Content"]?.text ?? "" }
            } else if result.status < 500 {
                outcome = .refused
            }
        }
        let answeredAt = Int64(Date().timeIntervalSince1970 * 1000)
        state.withLock {
            $0.pushes.append(Push(user: user, seq: seq, dedupID: message.dedupID, phase: phase, pushedAtMs: pushedAt, outcome: outcome))
            if let passive { $0.passive.append((passive, answeredAt)) }
        }
    }

    private func apply(_ fault: ChaosFault, _ stack: Stack, _ rng: inout SplitMix64) async throws {
        func faults(_ change: (inout FakePlatform.Faults) -> Void, for seconds: Double) async throws {
            var f = FakePlatform.Faults()
            change(&f)
            platform.faults = f
            try await Task.sleep(for: .seconds(seconds))
            platform.faults = FakePlatform.Faults()
        }
        switch fault {
        case .killWorker:
            let victim = Int(rng.next() % UInt64(settings.workers))
            try await stack.killAndReplaceWorker(victim)
        case .pauseWorker:
            let victim = Int(rng.next() % UInt64(settings.workers))
            try await stack.pauseWorker(victim, for: .seconds(14))
        case .restartRabbitMQ:
            // Every node of a cluster (started again together, as a stopped cluster must).
            try await stack.services(["rabbitmq-stop"])
            try await Task.sleep(for: .seconds(2))
            try await stack.services(["rabbitmq-start"])
            if settings.cluster { try await stack.waitUntilQueuesInSync() }
        case .stopLeaderNode: try await stack.stopNode(try await stack.nodeLeadingMostShards(), for: .seconds(10))
        case .stopIngressNode: try await stack.stopNode(try await stack.nodeOfIngresses(), for: .seconds(10))
        case .redisFailover: try await stack.redisFailover()
        case .restartRedis:
            try await stack.restartRedis()
        case .memoryAlarm:
            try await stack.services(["rabbitmqctl", "set_vm_memory_high_watermark", "0"])
            try await Task.sleep(for: .seconds(5))
            try await stack.services(["rabbitmqctl", "set_vm_memory_high_watermark", "0.4"])
        case .apiErrors: try await faults({ $0.errorRate = 0.3 }, for: 8)
        case .tokenRejections: try await faults({ $0.expireTokens = true }, for: 2)
        case .apiTimeouts: try await faults({ $0.dropRate = 0.1 }, for: 8)
        case .slowAPI: try await faults({ $0.latencyMs = 1500 }, for: 8)
        case .handoverStorm: try await stack.handoverStorm()
        case .slowIngress: try await stack.pauseIngress(Int(rng.next() % UInt64(settings.ingresses)), for: .seconds(7))
        }
    }

    /// Waits until every accepted push has a reply or sits in the dead letters (bounded), then
    /// a few seconds more for late duplicates.
    private func drain(_ stack: Stack) async throws {
        let deadline = ContinuousClock.now + .seconds(150)
        while ContinuousClock.now < deadline {
            let answered = Set((platform.messages().map(\.content) + state.withLock { $0.passive.map(\.content) }).compactMap { Self.parse($0)?.key })
            let waiting = state.withLock { $0.pushes }.filter { $0.outcome == .accepted && !answered.contains("\($0.user):\($0.seq)") }
            if waiting.isEmpty { break }
            if try await stack.deadLetterIDs().isSuperset(of: waiting.map(\.dedupID)) { break }
            try await Task.sleep(for: .seconds(1))
        }
        try await Task.sleep(for: .seconds(3))
    }

    // MARK: - The check

    /// `c:<user>:<seq> n=<messages>` → (user:seq, user, seq, n).
    static func parse(_ content: String?) -> (key: String, user: String, seq: Int, n: Int)? {
        guard let content, content.hasPrefix("c:") else { return nil }
        let parts = content.dropFirst(2).split(separator: " ")
        guard parts.count == 2, parts[1].hasPrefix("n=") else { return nil }
        let us = parts[0].split(separator: ":")
        guard us.count == 2, let seq = Int(us[1]), let n = Int(parts[1].dropFirst(2)) else { return nil }
        return ("\(us[0]):\(seq)", String(us[0]), seq, n)
    }

    private func check(_ stack: Stack, schedule: [ChaosFault]) async throws -> ChaosReport {
        await stack.scrapeAll()
        let dead = try await stack.deadLetterIDs()
        let (pushes, uncertain, faultErrors) = state.withLock { ($0.pushes, $0.uncertain.values.reduce(0, +), $0.faultErrors) }
        var replies: [String: [(seq: Int, n: Int, at: Int64)]] = [:]
        // Both channels, in the order the replies went out (sorted by time; stable for ties).
        let passive = state.withLock { $0.passive }
        let all = platform.messages().filter { $0.api == "custom" }.map { ($0.content, $0.receivedAtMs) } + passive.map { ($0.content, $0.at) }
        for (content, at) in all.enumerated().sorted(by: { ($0.element.1, $0.offset) < ($1.element.1, $1.offset) }).map(\.element) {
            guard let p = Self.parse(content) else { continue }
            replies[p.user, default: []].append((p.seq, p.n, at))
        }
        var rows: [String: ChaosReport.Row] = [:]
        var order = ["quiet"]
        for fault in schedule where !order.contains(fault.rawValue) { order += [fault.rawValue, "after-\(fault.rawValue)"] }
        func row(_ phase: String) -> ChaosReport.Row {
            if !order.contains(phase) { order.append(phase) }
            return rows[phase] ?? ChaosReport.Row(phase: phase)
        }
        var deadLettered = 0
        var examples: [String] = []
        let byUser = Dictionary(grouping: pushes, by: \.user)
        for (user, userPushes) in byUser.sorted(by: { $0.key < $1.key }) {
            var anomalous = false
            let got = replies[user] ?? []
            var counts: [Int: Int] = [:]
            for r in got { counts[r.seq, default: 0] += 1 }
            let hasUnknown = userPushes.contains { $0.outcome == .unknown }
            // Replies in push order: a first reply whose seq is below an earlier reply's is reordered.
            // (Among accepted pushes only: an unknown one may have reached the ingress late.)
            let published = Set(userPushes.filter { $0.outcome == .accepted }.map(\.seq))
            var highest = 0
            var reorderedSeqs: Set<Int> = []
            var seen: Set<Int> = []
            var firstN: [Int: (n: Int, at: Int64)] = [:]
            for r in got where !seen.contains(r.seq) {
                seen.insert(r.seq)
                firstN[r.seq] = (r.n, r.at)
                guard published.contains(r.seq) else { continue }
                if r.seq < highest { reorderedSeqs.insert(r.seq) }
                highest = max(highest, r.seq)
            }
            for p in userPushes.sorted(by: { $0.seq < $1.seq }) {
                var r = row(p.phase)
                r.pushes += 1
                let n = counts[p.seq, default: 0]
                switch p.outcome {
                case .accepted:
                    r.accepted += 1
                    if n == 0 {
                        if dead.contains(p.dedupID) { deadLettered += 1 } else { r.lost += 1 }
                    }
                case .refused:
                    r.refused += 1
                    if n > 0 { r.answeredRefused += 1 }
                case .unknown:
                    r.unknown += 1
                    if n == 0, dead.contains(p.dedupID) { deadLettered += 1 }
                }
                r.replies += n
                r.duplicated += max(0, n - 1)
                if reorderedSeqs.contains(p.seq) { r.reordered += 1 }
                if let first = firstN[p.seq] {
                    r.worstLatencyMs = max(r.worstLatencyMs, first.at - p.pushedAtMs)
                    // The session counted exactly the published messages up to this one.
                    if !hasUnknown, first.n != published.filter({ $0 <= p.seq }).count { r.sessionWrong += 1 }
                }
                let before = rows[p.phase]
                rows[p.phase] = r
                if let b = before, r.lost + r.duplicated + r.reordered + r.answeredRefused + r.sessionWrong
                    > b.lost + b.duplicated + b.reordered + b.answeredRefused + b.sessionWrong
                {
                    anomalous = true
                } else if before == nil, r.lost + r.duplicated + r.reordered + r.answeredRefused + r.sessionWrong > 0 {
                    anomalous = true
                }
            }
            if anomalous, examples.count < 8 {
                let outcomes = userPushes.sorted { $0.seq < $1.seq }.map { "\($0.seq)\($0.outcome == .accepted ? "" : $0.outcome == .refused ? "r" : "?")" }
                examples.append("\(user): pushed \(outcomes.joined(separator: " ")); replies (seq/n) \(got.map { "\($0.seq)/\($0.n)" }.joined(separator: " "))")
            }
        }
        var total = ChaosReport.Row(phase: "total")
        for phase in order {
            guard let r = rows[phase] else { continue }
            total.pushes += r.pushes
            total.accepted += r.accepted
            total.refused += r.refused
            total.unknown += r.unknown
            total.replies += r.replies
            total.lost += r.lost
            total.duplicated += r.duplicated
            total.reordered += r.reordered
            total.answeredRefused += r.answeredRefused
            total.sessionWrong += r.sessionWrong
            total.worstLatencyMs = max(total.worstLatencyMs, r.worstLatencyMs)
        }
        return ChaosReport(
            seed: settings.seed, rows: order.map { rows[$0] ?? ChaosReport.Row(phase: $0) }, total: total, uncertain: uncertain, deadLettered: deadLettered,
            passiveReplies: passive.count, faultErrors: faultErrors, examples: examples)
    }

    // MARK: - Helpers for the stack

    func freePorts(_ n: Int) async throws -> [Int] {
        let out = try await command(settings.repository + "/ops/services", ["free-ports", "\(n)"], log: "services.log")
        let ports = out.split(separator: "\n").compactMap { Int($0) }
        guard ports.count == n else { throw ChaosError(message: "ops/services free-ports gave \(ports.count) ports") }
        return ports
    }

    func command(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, log: String) async throws -> String {
        try await Command(
            executable: executable, arguments: arguments, environment: environment ?? ProcessInfo.processInfo.environment,
            directory: settings.repository, errorLog: "\(settings.directory)/logs/\(log)"
        ).run()
    }

    func noteUncertain(_ key: String, _ count: Int) {
        state.withLock { $0.uncertain[key] = max($0.uncertain[key] ?? 0, count) }
    }

    func nextWorkerNumber() -> Int {
        state.withLock { s in
            defer { s.nextWorker += 1 }
            return s.nextWorker
        }
    }
}

public struct ChaosError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// A one-way flag.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}

/// A small seeded generator (SplitMix64), so that a seed makes the fault schedule repeatable.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
