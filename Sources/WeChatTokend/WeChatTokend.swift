import ArgumentParser
import Hummingbird
import Logging
import Redis
import RelayCore
import ServiceLifecycle
import Tokend

/// `wechat-tokend`: the central access_token / jsapi_ticket keeper (中控服务器).
@main
struct WeChatTokendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-tokend",
        abstract: "Central access_token / jsapi_ticket keeper with an HTTP API.",
        discussion: """
            Configured by environment variables (or ./.env; the environment wins): WECHAT_APPID and WECHAT_SECRET
            (one account) and/or WECHAT_ACCOUNTS_FILE (several, served under /v1/accounts/<appid>/…; re-read on
            SIGHUP and when it changes), TOKEND_SECRET (required), WECHAT_API_URL, REDIS_URL, HTTP_HOST, HTTP_PORT (8081), LOG_LEVEL,
            TOKEND_FETCH_MODE (stable | token; default stable), TOKEND_REFRESH_MARGIN (seconds, default 600).
            Keys in Redis and the API: docs/tokend.md and docs/CONTRACT.md.
            """
    )

    func run() async throws {
        try await exitOnConfigurationError("wechat-tokend") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let configuration = try TokendConfiguration(env)
            let logger = RelayBootstrap.logger("wechat-tokend", appIDs: configuration.accounts.map(\.appID))
            let redis = RedisPool(configuration: configuration.redis, size: 8, logger: logger)
            let tokend = Tokend(configuration: configuration, redis: redis, logger: logger, registry: RelayBootstrap.metrics())
            let app = Application(
                router: buildTokendRouter(tokend), server: RelayHTTP.server(idleTimeout: .seconds(30)),
                configuration: .init(address: .hostname(configuration.host, port: configuration.port)), logger: logger)
            logger.info(
                "wechat-tokend starting",
                metadata: [
                    "http.address": "\(configuration.host):\(configuration.port)", "redis.url": "\(configuration.redis.redactedURL)",
                    "wechat.api": "\(configuration.apiURL)", "tokend.mode": "\(configuration.endpoint.rawValue)",
                ])
            // WECHAT_ACCOUNTS_FILE is re-read on SIGHUP and when it changes; a file that does not
            // load changes nothing (logged).
            let reloader = AccountsReloader(file: configuration.accountsFile, logger: logger) {
                try AccountsConfiguration.load(try await RelayEnvironment.load())
            } apply: { try tokend.reload($0) }
            try await RelayBootstrap.runUntilSignalled([redis, TokendRefresher(tokend: tokend), reloader, app], logger: logger)
        }
    }
}
