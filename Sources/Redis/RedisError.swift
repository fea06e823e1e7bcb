/// The one error type of the Redis module.
public struct RedisError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// The `redis://` or `unix:` URL could not be parsed.
        case invalidURL
        /// Could not connect (refused, unreachable, timed out).
        case connectionFailed
        /// AUTH was refused (wrong user or password), or SELECT failed.
        case authenticationFailed
        /// The connection broke while a command was in flight; its effect is unknown.
        case connectionLost
        /// No reply within the command timeout; the connection was dropped.
        case timeout
        /// Redis answered with an error reply (`WRONGTYPE …`, `ERR …`).
        case serverError
        /// Redis answered that it cannot serve this now, though it may soon: `LOADING` (reading
        /// its data after a restart), `READONLY` (a replica, during a failover), `BUSY` (a
        /// script runs), `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`, `OOM`. An outage, not a bug.
        case unavailable
        /// The reply could not be read or had an unexpected shape.
        case protocolError
        /// The pool was closed.
        case closed
    }

    public var code: Code
    /// One line, safe to log: never contains a password or a value.
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// Whether retrying later may succeed (after Redis comes back).
    public var isRetriable: Bool {
        switch code {
        case .connectionFailed, .connectionLost, .timeout, .unavailable: return true
        case .invalidURL, .authenticationFailed, .serverError, .protocolError, .closed: return false
        }
    }

    public var description: String { "RedisError.\(code.rawValue): \(message)" }

    /// The error for an error reply: ``Code/unavailable`` for the replies that mean
    /// "try later", ``Code/serverError`` for the rest.
    public static func reply(_ message: String) -> RedisError {
        let prefix = message.prefix { $0 != " " }
        return RedisError(tryLaterPrefixes.contains(String(prefix)) ? .unavailable : .serverError, message)
    }

    /// Error-reply prefixes that mean Redis may serve the same command a little later.
    public static let tryLaterPrefixes: Set<String> = ["LOADING", "READONLY", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM"]
}
