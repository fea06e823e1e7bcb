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
        case .connectionFailed, .connectionLost, .timeout: return true
        case .invalidURL, .authenticationFailed, .serverError, .protocolError, .closed: return false
        }
    }

    public var description: String { "RedisError.\(code.rawValue): \(message)" }
}
