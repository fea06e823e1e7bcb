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
    let tokens = TokenClient(
        redis: redis, keys: TokenKeys(appID: configuration.appID, prefix: configuration.topology.prefix),
        tokendURL: configuration.tokendURL, tokendSecret: configuration.tokendSecret)
    let worker = Worker(
        amqp: amqp, publisher: publisher,
        store: SessionStore(
            redis: redis, appID: configuration.appID, prefix: configuration.topology.prefix,
            sessionTTL: configuration.sessionTTL, finishedTTL: configuration.finishedTTL),
        sender: Sender(apiURL: configuration.apiURL, http: http, tokens: tokens), rules: configuration.rules,
        handlers: handlers,
        decisionService: configuration.decideURL.map {
            DecisionService(url: $0, http: http, timeout: .seconds(configuration.decideTimeout), appID: configuration.appID)
        },
        topology: configuration.topology, concurrency: configuration.concurrency, metrics: metrics,
        logger: logger, uncertainSend: configuration.uncertainSend, claimLease: .seconds(configuration.claimLease),
        replyMode: configuration.replyMode)
    let app = Application(
        router: buildWorkerRouter(worker: worker, redis: redis), server: RelayHTTP.server(idleTimeout: .seconds(30)),
        configuration: .init(address: .hostname("0.0.0.0", port: configuration.metricsPort)), logger: logger)
    return WorkerApp(worker: worker, redis: redis, services: [amqp, publisher, redis, WorkerService(worker: worker), app])
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
    router.get("/metrics") { _, _ in worker.metrics.registry.emitToString() }
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
                // For example the broker refusing a declaration (a queue declared before with
                // other arguments): said, not retried in silence.
                worker.logger.error("the worker stopped consuming; starting again in 1 s", metadata: ["error": "\(error)"])
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(1)) }
            }
        }
    }
}
