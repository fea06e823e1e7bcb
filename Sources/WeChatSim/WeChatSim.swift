import Chaos
import ArgumentParser
import AsyncHTTPClient
import Foundation
import Hummingbird
import Logging
import RelayCore
import ServiceLifecycle
import Simulator
import WeChat

/// `wechat-sim`: a local stand-in for the WeChat platform.
@main
struct WeChatSimCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-sim",
        abstract: "Local stand-in for the WeChat platform: pushes signed messages, serves a fake API, benchmarks.",
        discussion: """
            Configured by environment variables (or ./.env; the environment wins): WECHAT_APPID, WECHAT_TOKEN,
            WECHAT_AES_KEY, WECHAT_SECRET, HTTP_HOST, HTTP_PORT (8090), LOG_LEVEL. See docs/CONTRACT.md.
            """,
        subcommands: [APICommand.self, SendCommand.self, VerifyCommand.self, BenchCommand.self, ChaosCommand.self]
    )
}

/// `wechat-sim api`: serves the fake `api.weixin.qq.com`.
struct APICommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api",
        abstract: "Serve a fake api.weixin.qq.com (token, stable_token, getticket, custom/send, typing, template/send, menu).",
        discussion: """
            Needs WECHAT_APPID and WECHAT_SECRET, and/or WECHAT_ACCOUNTS_FILE (every account needs its secret;
            /sim/… requests then take &appid=…). Inspect what was sent with GET /sim/messages[?touser=…]
            (DELETE clears); set faults with POST /sim/faults {"errorRate":0.1,"latencyMs":50,"dropRate":0,
            "expireTokens":false,"quotaExhausted":false}.
            """
    )

    @Option(help: "Lifetime of tokens and tickets, seconds.") var tokenLifetime: Int = 7200
    @Option(help: "Seconds a /cgi-bin/token token stays valid after a newer one is issued.") var overlap: Int = 300
    @Option(help: "Fraction of API calls answered errcode -1.") var errorRate: Double = 0
    @Option(help: "Milliseconds added to every API call.") var latencyMs: Int = 0
    @Option(help: "Fraction of API calls left without an answer (a dropped connection).") var dropRate: Double = 0
    @Option(help: "Customer-service messages allowed per user after a message (WeChat: 5).") var messageQuota: Int = 5

    func run() async throws {
        try await exitOnConfigurationError("wechat-sim") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let platforms = try AccountsConfiguration.load(env).accounts.map { account in
                var settings = FakePlatform.Settings(appID: account.appID, secret: try account.require(.secret))
                settings.tokenLifetime = .seconds(tokenLifetime)
                settings.overlap = .seconds(overlap)
                settings.messageQuota = messageQuota
                let platform = FakePlatform(settings: settings)
                var faults = FakePlatform.Faults()
                faults.errorRate = errorRate
                faults.latencyMs = latencyMs
                faults.dropRate = dropRate
                platform.faults = faults
                return platform
            }
            let logger = Logger(label: "wechat-sim")
            let host = env.string("HTTP_HOST") ?? "0.0.0.0"
            let port = try env.port("HTTP_PORT", default: 8090)
            let app = Application(
                router: FakeAPI(platform: platforms[0], others: Array(platforms.dropFirst()), logger: logger).router(),
                configuration: .init(address: .hostname(host, port: port)), logger: logger)
            logger.info("fake WeChat API listening", metadata: ["http.address": "\(host):\(port)"])
            try await RelayBootstrap.runUntilSignalled([app], logger: logger)
        }
    }
}

/// Options shared by `send` and `verify`.
struct IngressOptions: ParsableArguments {
    @Option(help: "The ingress endpoint (with --appid, /<appid> is added to a URL ending in /wechat).")
    var url: String = "http://127.0.0.1:8080/wechat"
    @Option(help: "The account (of WECHAT_ACCOUNTS_FILE, or WECHAT_APPID) to push as; default: the first.") var appid: String?

    /// The account pushed as, and the ingress URL of its path.
    func account(env: RelayEnvironment) throws -> (spec: AccountSpec, url: String) {
        let accounts = try AccountsConfiguration.load(env)
        guard let spec = appid.map({ accounts.account($0) }) ?? accounts.accounts.first else {
            throw ConfigurationError(variable: "WECHAT_ACCOUNTS_FILE", reason: "no account \(appid ?? "") is configured")
        }
        let path = appid != nil && url.hasSuffix("/wechat") ? "\(url)/\(spec.appID)" : url
        return (spec, path)
    }

    func pusher(mode: Pusher.Mode, env: RelayEnvironment) throws -> Pusher {
        let (spec, path) = try account(env: env)
        let key: EncodingAESKey?
        if let text = spec.aesKey {
            do { key = try EncodingAESKey(text) } catch let e as WeChatError {
                throw ConfigurationError(variable: spec.place(.aesKey), reason: e.message)
            }
        } else {
            key = nil
        }
        if mode != .plaintext, key == nil {
            throw ConfigurationError(variable: spec.place(.aesKey), reason: "is required for --mode \(mode.rawValue)")
        }
        return Pusher(
            ingressURL: path, appID: spec.appID, token: try spec.require(.token),
            aesKey: key, accountID: spec.accountID ?? "gh_wechatrelay", mode: mode)
    }
}

extension Pusher.Mode: ExpressibleByArgument {}

/// `wechat-sim send`: pushes one message like WeChat does.
struct SendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Push one signed message or event to the ingress, like WeChat (5 s timeout, up to 3 tries).",
        discussion: """
            Examples:  wechat-sim send text 帮助 --wait-reply
                       wechat-sim send event subscribe
                       wechat-sim send event CLICK --event-key HELP --mode safe
            Needs WECHAT_APPID and WECHAT_TOKEN (and WECHAT_AES_KEY for --mode compatible or safe).
            """
    )

    @Argument(help: "text, image, voice, video, shortvideo, location, link, file, or event.") var kind: String
    @Argument(help: "The text (text), Recognition (voice), label/title, or the event name (event).") var value: String?
    @Option(help: "EventKey of an event.") var eventKey: String?
    @Option(help: "The sender's OpenID.") var openid: String = "oSimUser000000000000000001"
    @Option(help: "plaintext, compatible or safe.") var mode: Pusher.Mode = .plaintext
    @OptionGroup var ingress: IngressOptions
    @Option(help: "The fake API (wechat-sim api), told about the push and asked for the reply.") var api: String = "http://127.0.0.1:8090"
    @Flag(help: "Wait (up to --reply-timeout seconds) for the reply at the fake API and print it.") var waitReply = false
    @Option(help: "Seconds to wait for the reply.") var replyTimeout: Int = 10

    func run() async throws {
        try await exitOnConfigurationError("wechat-sim") {
            let env = try await RelayEnvironment.load()
            let pusher = try ingress.pusher(mode: mode, env: env)
            let xml = try PushBuilder.xml(kind: kind, value: value, eventKey: eventKey, from: openid, to: pusher.accountID)
            let message = try InboundMessage(xml: xml)
            let client = HTTPClient.shared
            // The fake API opens the user's customer-service window, as WeChat would.
            let before = try await FakeAPIClient(baseURL: api, appID: pusher.appID).register(push: message, client: client)
            let result = try await pusher.push(xml, openID: openid, client: client)
            let tries = "after \(result.tries) tr\(result.tries == 1 ? "y" : "ies")"
            guard result.status == 200 else {
                print("ingress answered \(result.status) \"\(result.body)\" \(tries)")
                throw ExitCode.failure
            }
            // A passive reply (INGRESS_REPLY_WAIT and a passive WORKER_REPLY_MODE) is the answer itself.
            if let passive = try pusher.passiveReply(in: result.body) {
                print("ingress answered 200 with a passive reply (\(result.body.utf8.count) bytes) \(tries)")
                let type = passive[child: "MsgType"]?.text ?? "?"
                print("reply (\(type), passive: in the HTTP response): \(passive[child: "Content"]?.text ?? "(a \(type) reply)")")
                return
            }
            print("ingress answered 200 \"\(result.body)\" \(tries)")
            if waitReply {
                let reply = try await FakeAPIClient(baseURL: api, appID: pusher.appID).waitForReply(
                    to: openid, after: before, timeout: .seconds(replyTimeout), client: client)
                guard let reply else {
                    print("no reply within \(replyTimeout) s")
                    throw ExitCode.failure
                }
                print("reply (\(reply.msgtype), via the customer-service API): \(reply.content ?? reply.body)")
            }
        }
    }
}

/// `wechat-sim verify`: the URL-verification GET.
struct VerifyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify", abstract: "Perform WeChat's URL-verification GET against the ingress.")
    @OptionGroup var ingress: IngressOptions

    func run() async throws {
        try await exitOnConfigurationError("wechat-sim") {
            let env = try await RelayEnvironment.load()
            let (status, echoed) = try await ingress.pusher(mode: .plaintext, env: env).verify()
            print("ingress answered \(status); echostr \(echoed ? "echoed verbatim" : "NOT echoed")")
            guard echoed else { throw ExitCode.failure }
        }
    }
}

/// `wechat-sim bench`: the end-to-end benchmark.
struct ChaosCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos",
        abstract: "Run the whole stack under a push load with faults on a schedule; check every reply.",
        discussion: """
            Starts RabbitMQ and Redis (ops/services), tokend, ingress replicas and workers from --bin, serves the fake
            WeChat API itself, pushes from many users (with WeChat's retries) while it kills, pauses and restarts things,
            then checks, per user, from the fake API's log: every accepted push answered once (or dead-lettered, or
            duplicated only where a send was uncertain), replies in push order, session counters right, no reply to a
            refused push. Prints a table per fault. Exit status 1 when an invariant fails. A seed repeats a run.
            """
    )

    @Option(help: "Seed of the fault order and the victims.") var seed: UInt64 = 1
    @Option(help: "Seconds of pushing (the faults are spread over it).") var duration: Int = 120
    @Option(help: "How many times each fault comes.") var rounds: Int = 1
    @Option(help: "Distinct users.") var users: Int = 40
    @Option(help: "Pushes per second.") var rate: Double = 20
    @Option(help: "Worker processes.") var workers: Int = 3
    @Option(help: "Ingress replicas.") var ingresses: Int = 2
    @Flag(help: "Three RabbitMQ nodes in a cluster (adds the faults stop-leader-node and stop-ingress-node).") var cluster = false
    @Flag(help: "Redis with two replicas under three sentinels (adds redis-failover, drops restart-redis).") var sentinel = false
    @Option(help: "Only these faults (comma-separated names), each once per round.") var faults: String?
    @Flag(help: "Passive replies: the ingresses wait 1 s (INGRESS_REPLY_WAIT), the workers run passive-first.") var passive = false
    @Option(help: "The repository (for ops/services).") var repo: String = FileManager.default.currentDirectoryPath
    @Option(help: "Where the executables are (default: next to this one).") var bin: String?
    @Option(help: "The run's folder (logs, brokers' data); default a new temporary one.") var dir: String?
    @Option(help: "Also write the report as JSON to this file.") var json: String?

    func run() async throws {
        let own = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().path
        let folder = dir ?? FileManager.default.temporaryDirectory.appendingPathComponent("wechatrelay-chaos-\(UUID().uuidString)").path
        var settings = ChaosSettings(
            seed: seed, duration: duration, users: users, rate: rate, workers: workers, ingresses: ingresses, rounds: rounds,
            repository: repo, binaries: bin ?? own, directory: folder)
        settings.cluster = cluster
        settings.sentinel = sentinel
        settings.passive = passive
        if let faults {
            settings.faults = try faults.split(separator: ",").map { name in
                guard let fault = ChaosFault(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("unknown fault '\(name)'; known: \(ChaosFault.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                return fault
            }
        }
        guard !settings.schedule.isEmpty else { throw ValidationError("none of the faults applies to this stack (see --cluster, --sentinel)") }
        let report = try await ChaosRun(settings: settings) { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }.run()
        print(report.table)
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(report).write(to: URL(fileURLWithPath: json))
        }
        if !report.holds { throw ExitCode.failure }
    }
}

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Serve the fake API and push signed messages at a fixed rate; report throughput, latencies, lost and duplicated replies.",
        discussion: """
            The workers must send their replies to this process (WECHAT_API_URL=http://HOST:API_PORT) and get tokens
            for WECHAT_APPID/WECHAT_SECRET from it. Needs WECHAT_APPID, WECHAT_TOKEN, WECHAT_SECRET
            (and WECHAT_AES_KEY for --mode compatible or safe). Exits non-zero if anything was lost or duplicated.
            """
    )

    @OptionGroup var ingress: IngressOptions
    @Option(help: "Pushes per second (open loop).") var rate: Double = 200
    @Option(help: "Seconds of pushing.") var duration: Int = 10
    @Option(help: "Distinct users (OpenIDs) the pushes come from.") var users: Int = 100
    @Option(help: "plaintext, compatible or safe.") var mode: Pusher.Mode = .plaintext
    @Option(help: "Where the in-process fake API listens.") var apiHost: String = "127.0.0.1"
    @Option(help: "Port of the in-process fake API.") var apiPort: Int = 8090
    @Option(help: "Seconds to wait for the last replies.") var drainTimeout: Int = 30
    @Option(help: "Seconds to serve the fake API before pushing (lets tokend fetch its first token).") var warmup: Int = 0
    @Option(help: "Also write the report as JSON to this file (to compare runs).") var json: String?

    func run() async throws {
        try await exitOnConfigurationError("wechat-sim") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let pusher = try ingress.pusher(mode: mode, env: env)
            let platform = FakePlatform(
                settings: .init(appID: try env.required("WECHAT_APPID"), secret: try env.required("WECHAT_SECRET", isSecret: true)))
            let logger = Logger(label: "wechat-sim")
            let app = Application(
                router: FakeAPI(platform: platform, logger: logger).router(),
                configuration: .init(address: .hostname(apiHost, port: apiPort)), logger: logger)
            var clientConfiguration = HTTPClient.Configuration()
            clientConfiguration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 256
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: clientConfiguration)
            let group = ServiceGroup(configuration: .init(services: [.init(service: app)], logger: logger))
            let report = try await withThrowingTaskGroup(of: BenchReport?.self) { tasks in
                tasks.addTask {
                    try await group.run()
                    return nil
                }
                tasks.addTask {
                    if warmup > 0 { try await Task.sleep(for: .seconds(warmup)) }
                    let runner = BenchRunner(
                        settings: BenchSettings(rate: rate, duration: .seconds(duration), users: users, drainTimeout: .seconds(drainTimeout)),
                        pusher: pusher, platform: platform, client: client)
                    let report = await runner.run { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }
                    await group.triggerGracefulShutdown()
                    return report
                }
                var result: BenchReport?
                for try await r in tasks { if let r { result = r } }
                return result
            }
            try await client.shutdown()
            guard let report else { throw ExitCode.failure }
            print(Self.describe(report))
            if let json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try encoder.encode(report).write(to: URL(fileURLWithPath: json))
            }
            if report.lost > 0 || report.duplicated > 0 { throw ExitCode.failure }
        }
    }

    static func describe(_ r: BenchReport) -> String {
        func l(_ x: BenchReport.Latency) -> String {
            String(format: "p50 %.1f  p90 %.1f  p99 %.1f  max %.1f ms (n=%llu)", x.p50, x.p90, x.p99, x.max, x.count)
        }
        return """
            pushed \(r.pushed), accepted \(r.accepted) in \(String(format: "%.1f", r.seconds)) s (\(String(format: "%.0f", r.throughput))/s); errors \(r.errors)
            replies \(r.replies) (passive, in the HTTP response: \(r.passiveReplies)): lost \(r.lost), duplicated \(r.duplicated); refused by the fake API: \(r.refusedByAPI)
            ingress response:  \(l(r.ingressLatencyMs))
            push to reply:     \(l(r.pushToReplyMs))
            """
    }
}
