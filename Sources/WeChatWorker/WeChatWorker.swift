import AMQP
import ArgumentParser
import AsyncHTTPClient
import Foundation
import Hummingbird
import Logging
import NIOCore
import Redis
import RelayCore
import ServiceLifecycle
import TokenClient
import Worker
import RelayContract

/// `wechat-worker`: consumes, deduplicates, keeps sessions, decides and sends replies.
@main
struct WeChatWorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-worker",
        abstract: "Consumes pushed messages, deduplicates, keeps sessions in Redis, and replies through the customer-service API.",
        discussion: """
            Configured by environment variables (or ./.env; the environment wins): WECHAT_APPID (one account)
            and/or WECHAT_ACCOUNTS_FILE (several; re-read on SIGHUP and when it changes), AMQP_URL,
            REDIS_URL, WECHAT_API_URL, TOKEND_URL, TOKEND_SECRET, WORKER_RULES, WORKER_CONCURRENCY (64),
            WORKER_SEND_RATE (sends a second per account, 0 = no limit), WORKER_SEND_BURST, WORKER_DAILY_QUOTA (500000),
            METRICS_PORT (9100), WORKER_SESSION_TTL (seconds, 30 days), LOG_LEVEL. See docs/CONTRACT.md and docs/worker.md.
            """,
        subcommands: [Run.self, DeadLetters.self, MigrateKeys.self],
        defaultSubcommand: Run.self
    )
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Consume and reply (the default).")

    func run() async throws {
        try await exitOnConfigurationError("wechat-worker") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let configuration = try WorkerConfiguration(env)
            let logger = RelayBootstrap.logger("wechat-worker", appIDs: configuration.accounts.map(\.appID))
            let metrics = WorkerMetrics(registry: RelayBootstrap.metrics())
            // A send may start while the claim is younger than half its lease and take the 5 s
            // send timeout: at 10 s or less the claim can lapse with the request in flight, and
            // another worker would then find the message uncertain.
            if configuration.claimLease <= 10 {
                logger.warning(
                    "WORKER_CLAIM_LEASE is 10 s or less: a claim can lapse while its send is in flight (keep it well above twice the 5 s send timeout)",
                    metadata: ["worker.claim_lease": "\(configuration.claimLease)"])
            }
            let http = makeWorkerHTTPClient()
            let app = try buildWorker(configuration: configuration, metrics: metrics, logger: logger, http: http)
            logger.info(
                "wechat-worker starting",
                metadata: [
                    "amqp.url": "\(configuration.amqp.redactedURL)", "redis.url": "\(configuration.redis.redactedURL)",
                    "wechat.api": "\(configuration.apiURL)", "worker.concurrency": "\(configuration.concurrency)",
                    "worker.reply_mode": "\(configuration.replyMode.rawValue)",
                ])
            do {
                try await RelayBootstrap.runUntilSignalled(app.services, logger: logger)
            } catch {
                try? await http.shutdown()
                throw error
            }
            try? await http.shutdown()  // after the worker stopped: no send is left in flight
        }
    }
}

struct DeadLetters: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dead-letters", abstract: "Inspect and requeue messages that failed for good.",
        subcommands: [List.self, Replay.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the dead letters (they stay in the queue).")
        @Option(help: "At most this many.") var limit: Int = 100
        func run() async throws {
            try await exitOnConfigurationError("wechat-worker") {
                let tool = try await DeadLetterTool.make()
                let letters = try await tool.list(limit: limit)
                for l in letters { print(l) }
                print("\(letters.count) dead letter(s) shown")
                await tool.amqp.close()
            }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Publish dead letters back to their shard queue.")
        @Option(help: "At most this many.") var limit: Int = 1000
        func run() async throws {
            try await exitOnConfigurationError("wechat-worker") {
                let tool = try await DeadLetterTool.make()
                let n = try await tool.replay(limit: limit)
                print("\(n) dead letter(s) replayed")
                await tool.amqp.close()
            }
        }
    }
}

struct MigrateKeys: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate-keys",
        abstract: "Move sessions to the per-user key layout (once, after the old workers stopped; docs/operations.md).")

    func run() async throws {
        try await exitOnConfigurationError("wechat-worker") {
            let env = try await RelayEnvironment.load()
            let configuration = try WorkerConfiguration(env)
            var logger = Logger(label: "wechat-worker")
            logger.logLevel = .warning
            let redis = RedisPool(configuration: configuration.redis, size: 1, logger: logger)
            defer { redis.close() }
            let report = try await KeyLayoutMigration(redis: redis, prefix: configuration.topology.prefix).run()
            print(report)
        }
    }
}

extension DeadLetterTool {
    static func make() async throws -> DeadLetterTool {
        let env = try await RelayEnvironment.load()
        let configuration = try WorkerConfiguration(env)
        var logger = Logger(label: "wechat-worker")
        logger.logLevel = .warning
        let amqp = try await AMQPConnection.connect(configuration: configuration.amqp, topology: configuration.topology.inbound, logger: logger)
        return DeadLetterTool(amqp: amqp, topology: configuration.topology)
    }
}
