import Crypto
import Foundation
import Logging
import Metrics
import Prometheus
import ServiceLifecycle

/// Process-wide set-up shared by the executables.
public enum RelayBootstrap {
    /// Logs to stderr at `LOG_LEVEL` (trace … critical; default info).
    @discardableResult
    public static func logging(_ env: RelayEnvironment) throws -> Logger.Level {
        let text = env.string("LOG_LEVEL")?.lowercased() ?? "info"
        guard let level = Logger.Level(rawValue: text) else {
            throw ConfigurationError(
                variable: "LOG_LEVEL", reason: "must be one of trace, debug, info, notice, warning, error, critical; got '\(text)'")
        }
        LoggingSystem.bootstrap { label in
            var h = RelayLogHandler(label: label)
            h.logLevel = level
            return h
        }
        return level
    }

    /// The executable's logger, every line tagged with the account's AppID when it serves one
    /// account (with several, the lines about one account carry its AppID themselves).
    public static func logger(_ label: String, appIDs: [String]) -> Logger {
        var logger = Logger(label: label)
        if appIDs.count == 1 { logger[metadataKey: "wechat.appid"] = "\(appIDs[0])" }
        return logger
    }

    /// Runs `services` (started in order) until SIGTERM or SIGINT, then shuts them
    /// down gracefully in reverse order: the contract's shutdown for every executable.
    public static func runUntilSignalled(_ services: [any Service], logger: Logger) async throws {
        let group = ServiceGroup(
            configuration: .init(
                services: services.map { .init(service: $0) }, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }

    /// Routes swift-metrics to a Prometheus registry, which `/metrics` renders.
    public static func metrics() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }
}

/// swift-log's `StreamLogHandler` on stderr, except that metadata is formatted when a line is
/// written, not whenever it is set.
///
/// `StreamLogHandler` formats all of a logger's metadata every time one key is set, and
/// Hummingbird sets a request id on a logger for every request: about 3 % of the ingress's CPU
/// per request (BENCHMARKS.md, ingress profile) went into formatting metadata for lines that,
/// at the usual levels, are never written.
public struct RelayLogHandler: LogHandler {
    private var stream: StreamLogHandler
    public var metadata: Logger.Metadata = [:]

    public init(label: String) { stream = StreamLogHandler.standardError(label: label) }

    public var logLevel: Logger.Level {
        get { stream.logLevel }
        set { stream.logLevel = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { stream.metadataProvider }
        set { stream.metadataProvider = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line = stream
        line.metadata = metadata  // formatted here: only for a line that is written
        line.log(event: event)
    }
}

/// A short, stable, non-reversible tag for a secret (token, key), for log lines
/// that must tell two values apart without revealing them.
public func secretFingerprint(_ secret: String) -> String {
    let digest = SHA256.hash(data: Array(secret.utf8))
    return "sha256:" + digest.prefix(4).map { String(format: "%02x", $0) }.joined()
}

/// Runs an executable's body, turning a ``ConfigurationError`` into the contract's
/// one-line reason on stderr and a non-zero exit.
public func exitOnConfigurationError(_ program: String, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let e as ConfigurationError {
        FileHandle.standardError.write(Data("\(program): configuration error: \(e)\n".utf8))
        exit(2)
    }
}
