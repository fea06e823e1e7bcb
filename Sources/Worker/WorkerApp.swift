import AMQP
import AsyncHTTPClient
import Hummingbird
import Logging
import NIOCore
import Redis
import RelayAMQP
import RelayContract
import RelayCore
import ServiceLifecycle
import TokenClient

/// Everything `wechat-worker run` runs, assembled in one place: `main` and the tests both
/// build it with ``buildWorker(configuration:metrics:logger:handlers:http:)``.
///
/// Start ``services`` in one `ServiceGroup`, in this order (the connections stop after the
/// worker that uses them): the consuming and the publishing broker connection, the Redis
/// pool, the worker (``WorkerService``), the HTTP server of `/healthz`, `/readyz`, `/metrics`.
public struct WorkerApp: Sendable {
    public let worker: Worker
    public let redis: RedisPool
    public let services: [any Service]
}

/// Builds a worker from its configuration: two broker connections (consuming and acking;
/// publishing retries and dead letters, so that flow control on the publishing one never
/// holds an ack), the Redis pool, the token client, the sender, and the HTTP server on
/// `METRICS_PORT`.
public func buildWorker(
    configuration: WorkerConfiguration, metrics: WorkerMetrics, logger: Logger, handlers: [any MessageHandler] = [],
    http: HTTPClient = .shared
) throws -> WorkerApp {
    let amqp = try AMQPConnection(configuration: configuration.amqp, topology: configuration.topology.inbound, logger: logger)
    var publishing = configuration.amqp
    publishing.connectionName = configuration.amqp.connectionName.map { "\($0)-publish" }
    let publisher = try AMQPConnection(configuration: publishing, logger: logger)
    let redis = RedisPool(configuration: configuration.redis, size: max(4, min(64, configuration.concurrency)), logger: logger)
    let accounts = configuration.accounts.map { makeWorkerAccount($0, configuration: configuration, redis: redis, metrics: metrics, http: http) }
    let worker = Worker(
        amqp: amqp, publisher: publisher, accounts: accounts, handlers: handlers,
        topology: configuration.topology, concurrency: configuration.concurrency, metrics: metrics,
        logger: logger, uncertainSend: configuration.uncertainSend, claimLease: .seconds(configuration.claimLease),
        replyMode: configuration.replyMode)
    // WECHAT_ACCOUNTS_FILE is re-read on SIGHUP and when it changes; a file that does not load
    // changes nothing (logged). Accounts whose settings did not change are kept as they are.
    let reloader = AccountsReloader(file: configuration.accountsFile, logger: logger) {
        try AccountsConfiguration.load(try await RelayEnvironment.load())
    } apply: { loaded in
        let next = try loaded.accounts.map { spec -> WorkerAccount in
            let settings = try configuration.settings(for: spec)
            return worker.existingAccount(spec.appID, settings: settings)
                ?? makeWorkerAccount(settings, configuration: configuration, redis: redis, metrics: metrics, http: http)
        }
        try worker.reload(next)
    }
    let app = Application(
        router: buildWorkerRouter(worker: worker, redis: redis), server: RelayHTTP.server(idleTimeout: .seconds(30)),
        configuration: .init(address: .hostname("0.0.0.0", port: configuration.metricsPort)), logger: logger)
    return WorkerApp(worker: worker, redis: redis, services: [amqp, publisher, redis, WorkerService(worker: worker), reloader, app])
}

/// One account's sessions, token client, sender, decision service and rate limiter.
public func makeWorkerAccount(
    _ settings: WorkerAccountSettings, configuration: WorkerConfiguration, redis: RedisPool, metrics: WorkerMetrics, http: HTTPClient
) -> WorkerAccount {
    let prefix = configuration.topology.prefix
    let tokens = TokenClient(
        redis: redis, keys: TokenKeys(appID: settings.appID, prefix: prefix),
        tokendURL: configuration.tokendURL, tokendSecret: configuration.tokendSecret)
    let store = SessionStore(
        redis: redis, appID: settings.appID, prefix: prefix, sessionTTL: configuration.sessionTTL, finishedTTL: configuration.finishedTTL)
    return WorkerAccount(
        appID: settings.appID, store: store, sender: Sender(apiURL: configuration.apiURL, http: http, tokens: tokens),
        rules: settings.rules,
        decisionService: settings.decideURL.map {
            DecisionService(url: $0, http: http, timeout: .seconds(configuration.decideTimeout), appID: settings.appID)
        },
        replyMode: settings.replyMode,
        limiter: settings.sendRate > 0
            ? SendRateLimiter(redis: redis, key: store.keys.sendRate, rate: settings.sendRate, burst: settings.sendBurst) : nil,
        dailyQuota: settings.dailyQuota, metrics: metrics, settings: settings)
}

/// The worker's client for WeChat's API (a caller shuts it down when the worker has stopped).
///
/// Unlike `HTTPClient.shared` (a browser-like configuration): redirects are refused (a POST
/// followed to another place could send a reply twice), answers are not decompressed (WeChat
/// answers a few bytes of JSON), a connection attempt gives up after 2 s, and request tracing
/// is off — with no tracer bootstrapped, the client still built every request's span
/// attributes, URL parsing included (about 3 % of the worker's CPU, BENCHMARKS.md).
public func makeWorkerHTTPClient(connections: Int = 16) -> HTTPClient {
    var c = HTTPClient.Configuration()
    c.redirectConfiguration = .disallow
    c.decompression = .disabled
    c.timeout = .init(connect: .seconds(2), read: .seconds(10))
    c.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = connections
    c.tracing.tracer = nil
    return HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: c)
}

/// The worker's HTTP endpoints: `/healthz` (the process runs), `/readyz` (consuming every
/// shard it owns and Redis answers; else 503 saying which is missing), `/metrics`.
public func buildWorkerRouter(worker: Worker, redis: RedisPool) -> Router<BasicRequestContext> {
    let router = Router()
    router.get("/healthz") { _, _ in "ok" }
    router.get("/readyz") { _, _ -> Response in
        let redisUp = (try? await redis.send(["PING"])) != nil
        let ok = worker.isConsuming && redisUp
        return Response(
            status: ok ? .ok : .serviceUnavailable,
            body: ResponseBody(byteBuffer: ByteBuffer(string: ok ? "ready" : "consuming=\(worker.isConsuming) redis=\(redisUp)")))
    }
    router.get("/metrics") { _, _ in
        for account in worker.servedAccounts { account.refreshQuotaGauge() }
        return worker.metrics.registry.emitToString()
    }
    return router
}

/// Runs the worker inside a `ServiceGroup`, retrying while RabbitMQ is down; graceful
/// shutdown ends it (also while it waits for the broker).
public struct WorkerService: Service {
    public let worker: Worker

    public init(worker: Worker) { self.worker = worker }

    public func run() async throws {
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            do {
                // Cancelled by graceful shutdown, so SIGTERM while RabbitMQ is down still exits at once.
                try await cancelWhenGracefulShutdown { try await worker.amqp.waitUntilConnected() }
                try await worker.run()
            } catch {
                if Task.isShuttingDownGracefully {
                    if !(error is CancellationError) { worker.logger.debug("the worker stopped during shutdown", metadata: ["error": "\(error)"]) }
                    return
                }
                // For example the broker refusing a declaration (a queue declared before with
                // other arguments): said, not retried in silence.
                worker.logger.error("the worker stopped consuming; starting again in 1 s", metadata: ["error": "\(error)"])
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(1)) }
            }
        }
    }
}
