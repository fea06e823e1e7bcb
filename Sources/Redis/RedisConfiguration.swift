import Foundation

/// Where Redis is and how to talk to it.
///
/// From `redis://[user:password@]host[:port][/db]` (percent-decoded) or
/// `unix:///path/to/redis.sock[?db=N][&password=…]` (also `unix:/path`).
public struct RedisConfiguration: Sendable {
    public enum Endpoint: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var endpoint: Endpoint
    public var user: String?
    public var password: String?
    public var database: Int
    public var connectTimeout: Duration
    /// A command without a reply in this time fails with ``RedisError/Code/timeout``.
    public var commandTimeout: Duration

    public init(url: String) throws {
        guard let c = URLComponents(string: url), let scheme = c.scheme?.lowercased() else {
            throw RedisError(.invalidURL, "Redis URL must look like redis://host:6379/0 or unix:///path")
        }
        var db = 0
        switch scheme {
        case "redis":
            guard let host = c.host, !host.isEmpty else { throw RedisError(.invalidURL, "Redis URL has no host") }
            if let port = c.port, !(1...65535).contains(port) {
                throw RedisError(.invalidURL, "Redis URL has an invalid port \(port)")
            }
            endpoint = .tcp(host: host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: c.port ?? 6379)
            let path = c.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
            if !path.isEmpty {
                guard let n = Int(path), n >= 0 else { throw RedisError(.invalidURL, "Redis URL's database '\(path)' is not a number") }
                db = n
            }
        case "unix":
            guard !c.path.isEmpty else { throw RedisError(.invalidURL, "unix: Redis URL has no socket path") }
            endpoint = .unix(path: c.path)
        case "rediss":
            throw RedisError(.invalidURL, "rediss:// (TLS) is not supported; use redis:// or a TLS tunnel")
        default:
            throw RedisError(.invalidURL, "unsupported Redis URL scheme '\(scheme)'")
        }
        let query = Dictionary((c.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { a, _ in a })
        if let q = query["db"] {
            guard let n = Int(q), n >= 0 else { throw RedisError(.invalidURL, "Redis URL's db '\(q)' is not a number") }
            db = n
        }
        user = c.user.flatMap { $0.isEmpty ? nil : $0 }
        password = c.password ?? query["password"]
        if user != nil, password == nil {
            // redis://secret@host means the password of the default user, as redis-cli reads it.
            password = user
            user = nil
        }
        database = db
        connectTimeout = .seconds(2)
        commandTimeout = .seconds(2)
    }

    /// The URL without the password, for log lines.
    public var redactedURL: String {
        switch endpoint {
        case .tcp(let host, let port):
            let who = user.map { "\($0)@" } ?? (password != nil ? "***@" : "")
            return "redis://\(who)\(host.contains(":") ? "[\(host)]" : host):\(port)/\(database)"
        case .unix(let path): return "unix://\(path)?db=\(database)"
        }
    }
}
