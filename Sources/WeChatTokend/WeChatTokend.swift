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
            Configured by environment variables (or ./.env; the environment wins): WECHAT_APPID, WECHAT_SECRET,
            TOKEND_SECRET (all required), WECHAT_API_URL, REDIS_URL, HTTP_HOST, HTTP_PORT (8081), LOG_LEVEL,
            TOKEND_FETCH_MODE (stable | token; default stable), TOKEND_REFRESH_MARGIN (seconds, default 600).
            Keys in Redis and the API: docs/tokend.md and docs/CONTRACT.md.
            """
    )

    func run() async throws {
        try await exitOnConfigurationError("wechat-tokend") {
            let env = try await RelayEnvironment.load()
            try RelayBootstrap.logging(env)
            let configuration = try TokendConfiguration(env)
            let logger = RelayBootstrap.logger("wechat-tokend", appID: configuration.appID)
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
            try await RelayBootstrap.runUntilSignalled([redis, TokendRefresher(tokend: tokend), app], logger: logger)
        }
    }
}
