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
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        return level
    }

    /// The executable's logger, every line tagged with the account's AppID.
    public static func logger(_ label: String, appID: String) -> Logger {
        var logger = Logger(label: label)
        logger[metadataKey: "wechat.appid"] = "\(appID)"
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
