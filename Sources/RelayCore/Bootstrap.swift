import Crypto
import Foundation
import Logging
import Metrics
import Prometheus

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
