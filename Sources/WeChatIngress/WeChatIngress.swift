import AMQP
import ArgumentParser
import Ingress
import Logging
import RelayCore
import ServiceLifecycle
import RelayAMQP

/// `wechat-ingress`: the HTTP endpoint that WeChat's servers call.
@main
struct WeChatIngressCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-ingress",
        abstract: "HTTP endpoint that WeChat's servers call; verifies every push and enqueues it durably to RabbitMQ.",
        discussion: """
            Configured by environment variables (or a .env file in the working directory; the environment wins):
              WECHAT_APPID and WECHAT_TOKEN (one account) and/or WECHAT_ACCOUNTS_FILE (several; re-read
              on SIGHUP and when it changes), WECHAT_AES_KEY, WECHAT_ACCOUNT_ID, WECHAT_ENCRYPTION,
              WECHAT_PREVIOUS_TOKEN, WECHAT_PREVIOUS_AES_KEY, AMQP_URL, HTTP_HOST, HTTP_PORT (8080),
              INGRESS_TIMESTAMP_WINDOW (300), INGRESS_MAX_BODY (65536), INGRESS_CONFIRM_TIMEOUT (4),
              INGRESS_REPLY_WAIT (0: no passive replies), LOG_LEVEL.
            Serves POST/GET /wechat/<appid> (and /wechat with one account), /healthz, /readyz and /metrics. See docs/CONTRACT.md.
            """
    )

    func run() async throws {
        try await exitOnConfigurationError("wechat-ingress") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let configuration = try IngressConfiguration(env)
            let logger = RelayBootstrap.logger("wechat-ingress", appIDs: configuration.accounts.map(\.appID))
            let metrics = IngressMetrics(registry: RelayBootstrap.metrics())
            // Connects in the background: until RabbitMQ is reachable, /readyz fails and pushes get 503.
            let amqp = try AMQPConnection(
                configuration: configuration.amqp, topology: configuration.topology.inbound, logger: logger)
            let handler = IngressHandler(configuration: configuration, amqp: amqp, metrics: metrics, logger: logger)
            let app = buildIngressApplication(handler, logger: logger)
            logger.info(
                "wechat-ingress starting",
                metadata: [
                    "http.address": "\(configuration.host):\(configuration.port)",
                    "amqp.url": "\(configuration.amqp.redactedURL)",
                    "wechat.accounts": "\(configuration.accounts.map { "\($0.appID) (\($0.encryption.rawValue))" }.joined(separator: ", "))",
                    "ingress.reply_wait": "\(configuration.replyWait)",
                ])
            // The HTTP server is last: it stops first (requests waiting for a passive reply finish
            // within INGRESS_REPLY_WAIT), then the reply queue's consumer, then the AMQP connection
            // drains its confirms.
            // WECHAT_ACCOUNTS_FILE is re-read on SIGHUP and when it changes; a file that does not
            // load changes nothing (logged).
            let reloader = AccountsReloader(file: configuration.accountsFile, logger: logger) {
                try AccountsConfiguration.load(try await RelayEnvironment.load())
            } apply: { try handler.reload($0) }
            let services: [any Service] = [amqp] + (handler.passive.map { [$0] } ?? []) + [reloader, app]
            try await RelayBootstrap.runUntilSignalled(services, logger: logger)
        }
    }
}
