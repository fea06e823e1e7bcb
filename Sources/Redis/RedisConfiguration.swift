import Foundation

/// Where Redis is and how to talk to it.
///
/// From `redis://[user:password@]host[:port][/db]` (percent-decoded),
/// `unix:///path/to/redis.sock[?db=N][&password=…]` (also `unix:/path`), or, for Redis
/// under Sentinel, `redis-sentinel://[user:password@]host1[:26379],host2…/MASTER[/db]`:
/// the sentinels are asked for MASTER's primary on every (re)connect, and the password is
/// the data nodes' (as for `redis://`). Query parameters of every form:
/// `wait_replicas=N` (writes whose loss would cause a duplicate reply wait for N replicas'
/// acknowledgement, `WAIT`; default 1 under Sentinel, else 0), `wait_timeout=MS` (1000),
/// `sentinel_password=…` (when the sentinels themselves require one).
public struct RedisConfiguration: Sendable {
    public enum Endpoint: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
        /// The primary of `master`, as the first of `sentinels` that answers names it.
        case sentinel(sentinels: [HostAndPort], master: String)
    }

    public struct HostAndPort: Sendable, Equatable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    public var endpoint: Endpoint
    public var user: String?
    public var password: String?
    public var database: Int
    public var connectTimeout: Duration
    /// A command without a reply in this time fails with ``RedisError/Code/timeout``.
    public var commandTimeout: Duration
    /// How many replicas must acknowledge the writes that guard against a second send
    /// (a claim, a sent mark) before they count (`WAIT`); 0 = none.
    public var waitReplicas: Int
    /// How long such a write waits for its replicas.
    public var waitTimeout: Duration
    /// The sentinels' own password, if they require one.
    public var sentinelPassword: String?

    public init(url: String) throws {
        if url.lowercased().hasPrefix("redis-sentinel://") {
            try self.init(sentinelURL: url)
        } else {
            try self.init(serverURL: url)
        }
    }

    /// `redis://…` or `unix:…`.
    private init(serverURL url: String) throws {
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
        sentinelPassword = nil
        (waitReplicas, waitTimeout) = try Self.waitSettings(query, defaultReplicas: 0)
    }

    /// `redis-sentinel://[user:password@]host1[:port],host2[:port]…/MASTER[/db][?…]`.
    private init(sentinelURL url: String) throws {
        let usage = "a Sentinel URL looks like redis-sentinel://host1:26379,host2:26379,host3:26379/mymaster/0"
        var rest = Substring(url.dropFirst("redis-sentinel://".count))
        var query: [String: String] = [:]
        if let q = rest.firstIndex(of: "?") {
            guard let items = URLComponents(string: "x:?" + rest[rest.index(after: q)...])?.queryItems else {
                throw RedisError(.invalidURL, "Redis Sentinel URL has an unreadable query")
            }
            query = Dictionary(items.map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { a, _ in a })
            rest = rest[..<q]
        }
        guard let slash = rest.firstIndex(of: "/") else { throw RedisError(.invalidURL, "Redis Sentinel URL has no master name: \(usage)") }
        var authority = rest[..<slash]
        let path = rest[rest.index(after: slash)...].split(separator: "/", omittingEmptySubsequences: false)
        user = nil
        password = nil
        if let at = authority.lastIndex(of: "@") {
            let info = authority[..<at]
            authority = authority[authority.index(after: at)...]
            func decoded(_ text: Substring) throws -> String {
                guard let d = String(text).removingPercentEncoding else {
                    throw RedisError(.invalidURL, "Redis Sentinel URL has a bad percent-escape in its user or password")
                }
                return d
            }
            if let colon = info.firstIndex(of: ":") {
                let name = try decoded(info[..<colon])
                user = name.isEmpty ? nil : name
                password = try decoded(info[info.index(after: colon)...])
            } else {
                password = try decoded(info)  // the default user's password, as redis-cli reads it
            }
        }
        var sentinels: [HostAndPort] = []
        for part in authority.split(separator: ",", omittingEmptySubsequences: false) {
            sentinels.append(try Self.hostAndPort(part, defaultPort: 26379, usage: usage))
        }
        guard !sentinels.isEmpty else { throw RedisError(.invalidURL, "Redis Sentinel URL names no sentinel: \(usage)") }
        guard let master = path.first.map(String.init)?.removingPercentEncoding, !master.isEmpty else {
            throw RedisError(.invalidURL, "Redis Sentinel URL has no master name: \(usage)")
        }
        var db = 0
        if path.count > 1, !path[1].isEmpty {
            guard let n = Int(path[1]), n >= 0 else { throw RedisError(.invalidURL, "Redis URL's database '\(path[1])' is not a number") }
            db = n
        }
        guard path.count <= 2 else { throw RedisError(.invalidURL, "Redis Sentinel URL has extra path segments: \(usage)") }
        endpoint = .sentinel(sentinels: sentinels, master: master)
        database = db
        connectTimeout = .seconds(2)
        commandTimeout = .seconds(2)
        sentinelPassword = query["sentinel_password"]
        (waitReplicas, waitTimeout) = try Self.waitSettings(query, defaultReplicas: 1)
    }

    private static func hostAndPort(_ text: Substring, defaultPort: Int, usage: String) throws -> HostAndPort {
        var host = text
        var port = defaultPort
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") {  // [IPv6]:port
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()) else { throw RedisError(.invalidURL, "Redis Sentinel URL has an invalid port in '\(text)'") }
                port = p
            }
        } else if let colon = host.lastIndex(of: ":") {
            guard let p = Int(host[host.index(after: colon)...]) else { throw RedisError(.invalidURL, "Redis Sentinel URL has an invalid port in '\(text)'") }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty else { throw RedisError(.invalidURL, "Redis Sentinel URL has an empty host: \(usage)") }
        guard (1...65535).contains(port) else { throw RedisError(.invalidURL, "Redis Sentinel URL has an invalid port \(port)") }
        return HostAndPort(host: String(host), port: port)
    }

    private static func waitSettings(_ query: [String: String], defaultReplicas: Int) throws -> (Int, Duration) {
        var replicas = defaultReplicas
        if let q = query["wait_replicas"] {
            guard let n = Int(q), (0...100).contains(n) else { throw RedisError(.invalidURL, "Redis URL's wait_replicas '\(q)' is not a number from 0 to 100") }
            replicas = n
        }
        var timeout = Duration.seconds(1)
        if let q = query["wait_timeout"] {
            // Below the 2 s command timeout, which a WAIT must not run into.
            guard let ms = Int(q), (1...1500).contains(ms) else {
                throw RedisError(.invalidURL, "Redis URL's wait_timeout '\(q)' is not a number of milliseconds from 1 to 1500")
            }
            timeout = .milliseconds(ms)
        }
        return (replicas, timeout)
    }

    /// The URL without the password, for log lines.
    public var redactedURL: String {
        switch endpoint {
        case .tcp(let host, let port):
            let who = user.map { "\($0)@" } ?? (password != nil ? "***@" : "")
            return "redis://\(who)\(host.contains(":") ? "[\(host)]" : host):\(port)/\(database)"
        case .unix(let path): return "unix://\(path)?db=\(database)"
        case .sentinel(let sentinels, let master):
            let who = user.map { "\($0)@" } ?? (password != nil ? "***@" : "")
            return "redis-sentinel://\(who)\(sentinels.map(\.description).joined(separator: ","))/\(master)/\(database)"
        }
    }
}
